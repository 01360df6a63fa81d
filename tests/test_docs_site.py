"""The docs site's reference pages cover the package, and the pages name code that exists.

``mkdocs build --strict`` (in ``make lint``) fails on a broken link or a reference to an
object it cannot find, but not on an object nobody wrote a ``:::`` line for, a CLI command
the generated page would silently drop, or a module path in prose that was renamed (the
stale ``cli.py`` of docs/architecture.md). These tests check that, without running mkdocs:
a new public name, error type or command fails here until its page has it.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from functools import cache
from pathlib import Path
from typing import Any

import click

import mlflow_ckpt
import mlflow_ckpt.manager
import mlflow_ckpt.manager.ranks
import mlflow_ckpt.storage
from mlflow_ckpt.errors import CheckpointError
from tests.test_layers import LAYERS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
API = DOCS / "reference" / "api.md"
CLI = DOCS / "reference" / "cli.md"
ERRORS = DOCS / "reference" / "errors.md"
# Pages whose prose names modules of the package (`manager/pipeline.py`, `catalog/models.commit`).
CODE_PAGES = [
    DOCS / "architecture.md",
    DOCS / "contributing.md",
    *sorted((DOCS / "concepts").glob("*.md")),
    *sorted((DOCS / "reference").glob("*.md")),
]


def directives(page: Path) -> list[str]:
    """The identifiers of the page's mkdocstrings blocks (``::: mlflow_ckpt.load``)."""
    found = re.findall(r"^::: ([\w.]+)\s*$", page.read_text(), flags=re.MULTILINE)
    return [f for f in found if f != "mkdocs-click"]


def documented_paths(obj: Any) -> set[str]:
    """The identifiers a ``:::`` line may use for ``obj``: where it is defined, or any
    package above that exports it (``mlflow_ckpt.load``, ``mlflow_ckpt.storage.StoreError``)."""
    parts = obj.__module__.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return {
        f"{prefix}.{obj.__qualname__}"
        for prefix in prefixes
        if getattr(importlib.import_module(prefix), obj.__qualname__, None) is obj
    } | {f"{obj.__module__}.{obj.__qualname__}"}


def error_types() -> list[type[CheckpointError]]:
    """Every subclass of CheckpointError the package defines (what users may catch)."""
    found, todo = [], [CheckpointError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return [c for c in found if c.__module__.startswith("mlflow_ckpt.")]


def test_every_public_name_is_rendered_on_the_api_page() -> None:
    rendered = set(directives(API))
    missing = [
        name
        for name in mlflow_ckpt.__all__
        if name != "__version__" and not documented_paths(getattr(mlflow_ckpt, name)) & rendered
    ]
    assert missing == [], f"add `::: mlflow_ckpt.<name>` lines to {API.relative_to(ROOT)}"
    assert len(rendered) == len(set(directives(API))) == len(directives(API)), "a name twice"


def test_every_policy_class_users_pass_is_rendered() -> None:
    rendered = set(directives(API))
    names = [n for n in mlflow_ckpt.manager.__all__ if n != "CheckpointManager"]
    assert {"EveryNSteps", "BestMetric", "KeepLastN", "KeepAny", "Trigger"} <= set(names)
    missing = [
        name
        for name in names
        if not documented_paths(getattr(mlflow_ckpt.manager, name)) & rendered
    ]
    assert missing == []


def test_every_error_type_is_rendered_and_explained() -> None:
    rendered = set(directives(API))
    sections = set(re.findall(r"^## (\w+)", ERRORS.read_text(), flags=re.MULTILINE))
    types = error_types()
    assert len(types) >= 10  # the errors module's nine, StoreError, RankError
    for cls in types:
        assert documented_paths(cls) & rendered, f"{cls.__name__} not on the API page"
        assert cls.__name__ in sections or cls is CheckpointError, (
            f"{cls.__name__} has no section in {ERRORS.relative_to(ROOT)}"
        )


@cache
def _defined(path: Path) -> dict[str, set[str]]:
    """Names bound at the top level of a module, each with its class's members (if any)."""
    names: dict[str, set[str]] = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef):
            names[node.name] = {
                m.name
                for m in node.body
                if isinstance(m, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            } | {
                t.id
                for m in node.body
                if isinstance(m, ast.AnnAssign | ast.Assign)
                for t in (m.targets if isinstance(m, ast.Assign) else [m.target])
                if isinstance(t, ast.Name)
            }
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names[node.name] = set()
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update({t.id: set() for t in targets if isinstance(t, ast.Name)})
        elif isinstance(node, ast.ImportFrom):
            names.update({a.asname or a.name: set() for a in node.names})
    return names


def exists(dotted: str) -> bool:
    """Whether ``mlflow_ckpt.x.y.Name.member`` names a module, or a name bound in one
    (read from the source: no import, so no optional dependency is needed)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:cut])
        module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else None
        module = module or (base / "__init__.py" if (base / "__init__.py").is_file() else None)
        if module is None:
            continue
        rest = parts[cut:]
        if not rest:
            return True
        names = _defined(module)
        return rest[0] in names and (
            len(rest) == 1 or (len(rest) == 2 and rest[1] in names[rest[0]])
        )
    return False


def test_every_api_directive_names_something_that_exists() -> None:
    assert [d for d in directives(API) if not exists(d)] == []


def test_no_api_directive_renders_a_module_that_a_function_shadows() -> None:
    """``mlflow_ckpt.autolog`` is the function at run time but the module to mkdocstrings's
    static analysis (the package imports the function over its own submodule's name)."""
    shadowed = []
    for identifier in directives(API):
        parent, _, name = identifier.rpartition(".")
        module_file = ROOT.joinpath(*identifier.split(".")).with_suffix(".py")
        if parent and module_file.is_file():
            bound = getattr(importlib.import_module(parent), name, None)
            if bound is not None and not inspect.ismodule(bound):
                shadowed.append(identifier)
    assert shadowed == [], "name the object where it is defined (mlflow_ckpt.autolog.autolog)"


def _click_directive() -> dict[str, str]:
    block = re.search(r"^::: mkdocs-click\n((?:    :\w+: .*\n)+)", CLI.read_text(), re.MULTILINE)
    assert block, f"{CLI.relative_to(ROOT)} has no mkdocs-click block"
    return dict(re.findall(r"^    :(\w+): (.*)$", block.group(1), flags=re.MULTILINE))


def test_the_cli_page_generates_every_command_of_the_installed_script() -> None:
    options = _click_directive()
    group = getattr(importlib.import_module(options["module"]), options["command"])
    script = re.search(
        r'^mlflow-ckpt = "([\w.]+):(\w+)"$', (ROOT / "pyproject.toml").read_text(), re.M
    )
    assert script, "pyproject.toml declares no mlflow-ckpt script"
    assert group is getattr(importlib.import_module(script.group(1)), script.group(2))
    assert isinstance(group, click.Group)
    assert options.get("prog_name") == "mlflow-ckpt"
    assert int(options.get("depth", "0")) >= 1, "subcommand headings under the group's"
    commands = group.list_commands(click.Context(group))
    assert {"list", "show", "verify", "gc", "best", "promote", "export", "diff"} <= set(commands)
    # mkdocs-click renders every subcommand, except hidden ones without :show_hidden:
    hidden = [c for c in commands if group.commands[c].hidden]
    assert hidden == [] or options.get("show_hidden") == "true"
    overview = set(re.findall(r"^\| `([\w-]+)` \|", CLI.read_text(), flags=re.MULTILINE))
    assert sorted(set(commands) - overview) == [], "add the command to the page's table"
    assert sorted(overview - set(commands)) == [], "the page's table names a removed command"


# `manager/pipeline.py`, `catalog/models.commit`, `mlflow_ckpt/codec/manifest.py`, `cli/`
_PATH = re.compile(r"^(?:mlflow_ckpt/)?([a-z_]+(?:/[a-z_0-9]+)*)(\.py)?((?:\.[A-Za-z_]\w*)*)(/?)$")
_TOP = {p.split(".")[1] for _, prefixes in LAYERS for p in prefixes}


def code_references(page: Path) -> list[str]:
    """Backticked paths into the package on ``page`` (``manager/saver.Saver._protected``)."""
    found = []
    for token in re.findall(r"`([^`\s]+)`", page.read_text()):
        match = _PATH.match(token)
        if not match or match.group(1).split("/")[0] not in _TOP:
            continue
        if "/" not in token and not token.endswith(".py"):
            continue  # a bare word (`manager`, `catalog`) is prose, not a path
        found.append(token)
    return found


def resolves(token: str) -> bool:
    match = _PATH.match(token)
    assert match
    folder, is_file, attrs, slash = match.groups()
    base = ROOT / "mlflow_ckpt" / folder
    if slash:
        return base.is_dir()
    if is_file:
        return base.with_suffix(".py").is_file() and (
            not attrs or exists(f"mlflow_ckpt.{folder.replace('/', '.')}{attrs}")
        )
    return exists(f"mlflow_ckpt.{folder.replace('/', '.')}{attrs}")


def test_module_paths_named_on_the_pages_exist() -> None:
    stale = [
        f"{page.relative_to(ROOT)}: `{token}`"
        for page in CODE_PAGES
        for token in code_references(page)
        if not resolves(token)
    ]
    assert stale == []
    assert len(code_references(DOCS / "architecture.md")) > 50  # the check sees the page


def test_the_architecture_layer_table_names_every_layer() -> None:
    """Each module or folder of tests/test_layers.py's LAYERS is in the page's layer table."""
    text = (DOCS / "architecture.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("| `")]
    first_cells = " ".join(line.split("|")[1] for line in table)
    for _, prefixes in LAYERS:
        for prefix in prefixes:
            name = prefix.removeprefix("mlflow_ckpt.")
            is_folder = (ROOT / "mlflow_ckpt" / name).is_dir()
            assert (f"`{name}/`" if is_folder else f"`{name}.py`") in first_cells, name

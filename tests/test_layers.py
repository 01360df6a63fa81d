"""The package's imports point down the layers of docs/architecture.md, with no cycle, and
its functions stay within the complexity bounds ``make lint`` enforces.

Every ``import`` of an ``mlflow_ckpt`` module counts, lazy ones inside functions included
(only ``if TYPE_CHECKING:`` blocks are skipped: they never run). Run this file directly to
print the picture: each module and the package modules it imports.

Modules have no line cap: a cap gets managed (statements packed onto one line, comments cut
to fit) rather than respected. What keeps code readable is each function's size, bounded by
ruff's C901 (cyclomatic complexity), PLR0912 (branches) and PLR0915 (statements).

    python tests/test_layers.py
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mlflow_ckpt"

# Lowest first. A module may import its own layer and the layers below it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("mlflow_ckpt._version", "mlflow_ckpt.errors")),
    ("storage", ("mlflow_ckpt.storage",)),
    ("codec", ("mlflow_ckpt.codec",)),
    ("snapshot", ("mlflow_ckpt.snapshot",)),
    ("folder", ("mlflow_ckpt.folder",)),
    ("catalog", ("mlflow_ckpt.catalog",)),
    ("manager", ("mlflow_ckpt.manager",)),
    (
        "flavor / integrations / cli",
        (
            "mlflow_ckpt.flavor",
            "mlflow_ckpt.integrations",
            "mlflow_ckpt.autolog",
            "mlflow_ckpt.lightning",
            "mlflow_ckpt.transformers",
            "mlflow_ckpt.cli",
            "mlflow_ckpt.after_training",
        ),
    ),
]


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (packages by their own name)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def layer_of(module: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports (a submodule, not its package, when named)."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "mlflow_ckpt"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if is_package else name.split(".")[:-1]
                here = here[: len(here) - node.level + 1]
                base = ".".join([*here, base] if base else here)
            if base.split(".")[0] != "mlflow_ckpt":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)
    out.discard(name)
    return {m for m in out if m in known}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(10_000)

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle() -> None:
    assert _cycles(graph()) == []


def test_imports_point_down_the_layers() -> None:
    edges = graph()
    upward = [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for module, targets in edges.items()
        if module != "mlflow_ckpt"  # the package itself is the public facade, on top
        for target in sorted(targets)
        if target != "mlflow_ckpt" and layer_of(target) > layer_of(module)
    ]
    assert upward == []
    assert all("mlflow_ckpt" not in targets for targets in edges.values())


# The same bounds as pyproject.toml's ruff tables, stated here too so that the suite holds
# the package to them even if the lint configuration drifts.
COMPLEXITY_RULES = "C901,PLR0912,PLR0915"
MAX_COMPLEXITY = 12


def test_functions_stay_simple() -> None:
    """Every function of the package within complexity 12, 12 branches and 50 statements."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "check",
            str(PACKAGE),
            "--no-cache",
            "--select",
            COMPLEXITY_RULES,
            "--config",
            f"lint.mccabe.max-complexity={MAX_COMPLEXITY}",
            "--output-format",
            "concise",
        ],
        capture_output=True,
        text=True,
        cwd=PACKAGE.parent,
        check=False,
    )
    offenders = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, f"split these functions into named helpers:\n{offenders}"


if __name__ == "__main__":
    edges = graph()
    for layer, (label, _) in reversed(list(enumerate(LAYERS))):
        print(f"== {label}")
        for module in sorted(m for m in edges if m != "mlflow_ckpt" and layer_of(m) == layer):
            lines = len(modules()[module].read_text().splitlines())
            short = sorted(t.removeprefix("mlflow_ckpt.") for t in edges[module])
            print(f"  {module.removeprefix('mlflow_ckpt.'):<34} {lines:>4}  -> {', '.join(short)}")

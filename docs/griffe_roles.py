"""A griffe extension for the API reference: the package's docstrings in Markdown.

The docstrings are written for ``help()`` and the source, in the reStructuredText habits of
Python's own documentation: ``:class:`~mlflow_ckpt.CheckpointManager```, ``:meth:`step```
and literal blocks after ``::``. mkdocstrings renders Markdown, where the roles would show
as ``:class:`` followed by code. Rewriting them here, once the package is loaded, keeps the
docstrings as they are and turns each role into a cross-reference: a link where the target
is on the site, plain code where it is not (an internal module), never a broken link.
"""

from __future__ import annotations

import ast
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj|const):`(~?)([^`]+)`")
# A paragraph ending in "::" introduces a literal block in reStructuredText.
LITERAL = re.compile(r"::\n(\n[ \t]+\S)")


def target_of(obj: griffe.Object, name: str) -> str:
    """The full path ``name`` means in the docstring of ``obj`` (``name`` itself when unknown)."""
    if name.startswith("."):
        package = obj.module.path.rsplit(".", 1)[0]
        return f"{package}.{name.lstrip('.')}"
    first, _, rest = name.partition(".")
    try:
        resolved = obj.resolve(first)
    except (griffe.NameResolutionError, AttributeError):
        return name
    return f"{resolved}.{rest}" if rest else resolved


def markdown(obj: griffe.Object, text: str) -> str:
    """``text`` with every role an optional cross-reference and ``::`` a plain colon."""

    def replace(match: re.Match[str]) -> str:
        short, name = match.group(1), match.group(2)
        shown = name.lstrip(".").rsplit(".", 1)[-1] if short else name.lstrip(".")
        return (
            f'<autoref identifier="{target_of(obj, name)}" optional><code>{shown}</code></autoref>'
        )

    return LITERAL.sub(r":\n\1", ROLE.sub(replace, text))


def objects(root: griffe.Object) -> list[griffe.Object]:
    """``root`` and every object defined under it (aliases are rendered from their target)."""
    found = [root]
    for member in root.members.values():
        if not member.is_alias:
            found.extend(objects(member))  # type: ignore[arg-type]
    return found


class SphinxRoles(griffe.Extension):
    """Rewrite the roles of every docstring of a loaded package (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        for module in [o for o in objects(pkg) if isinstance(o, griffe.Module)]:
            for name, member in list(module.members.items()):
                if not member.is_alias and member.is_attribute and member.docstring is None:
                    built = factory_class(module, name)
                    if built is not None:
                        module.set_member(name, built)
        for obj in objects(pkg):
            if obj.docstring is not None:
                obj.docstring.value = markdown(obj, obj.docstring.value)


def factory_class(module: griffe.Module, name: str) -> griffe.Class | None:
    """A class that ``module`` builds in a function and binds to ``name`` (Lightning's
    callback is made once per Lightning package): static analysis sees only an attribute,
    so the class is rebuilt from its definition in the source, docstring and bases."""
    if module.filepath is None or isinstance(module.filepath, list):
        return None
    tree = ast.parse(module.filepath.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == name and node not in tree.body:
            docstring = ast.get_docstring(node)
            if docstring is None:
                return None
            bases = [ast.unparse(b) for b in node.bases]
            cls = griffe.Class(
                name,
                lineno=node.lineno,
                endlineno=node.end_lineno,
                bases=[f"{module.path}.{b}" if b in module.members else b for b in bases],
                parent=module,
            )
            cls.docstring = griffe.Docstring(docstring, lineno=node.lineno + 1, parent=cls)
            return cls
    return None

"""Undoable monkey-patching: the only global state :func:`mlflow_ckpt.autolog` keeps.

Every replaced method is recorded; :func:`unpatch_all` puts each one back. A wrapper that
someone else has wrapped again cannot be removed without breaking them, so every wrapper
checks its record's ``active`` flag and becomes a pass-through once disabled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass
class Patch:
    """One replaced attribute: where, what it was, what replaced it, and whether it is on."""

    owner: Any
    name: str
    original: Any
    wrapper: Any
    active: bool = True


_PATCHES: list[Patch] = []


def patch(owner: Any, name: str, make: Callable[[Any, Patch], Any]) -> None:
    """Replace ``owner.name`` with ``make(original, record)``; undone by :func:`unpatch_all`."""
    original = owner.__dict__[name] if name in owner.__dict__ else getattr(owner, name)
    record = Patch(owner, name, original, None)
    record.wrapper = make(original, record)
    setattr(owner, name, record.wrapper)
    _PATCHES.append(record)


def unpatch_all() -> None:
    """Restore every patched method; one wrapped again by someone else is only deactivated."""
    while _PATCHES:
        record = _PATCHES.pop()
        record.active = False
        if record.owner.__dict__.get(record.name) is record.wrapper:
            setattr(record.owner, record.name, record.original)

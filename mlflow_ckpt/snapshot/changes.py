"""Which tensors of the state cannot have changed since the previous save.

An incremental save writes only bytes that changed. Finding out means hashing every tensor,
except for one kind that PyTorch vouches for: a frozen parameter (``requires_grad=False``)
whose version counter has not moved. Every in-place write through the tensor (or through
``state_dict()``'s detached view of it, which shares the counter) bumps that counter, so a
frozen backbone is neither copied at snapshot time nor hashed: the new checkpoint references
the bytes the previous one stored. A write through ``param.data`` is invisible to the
counter; nobody writes frozen weights that way, and trainable tensors, which optimizers may
update through ``.data``, are always compared by content.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from mlflow_ckpt.snapshot.stateful import unwrap_module

Identity = tuple[Any, ...]
# What a snapshot saw of one tensor: its identity (storage, offset, shape, stride, dtype,
# device) and its version counter (None where the tensor has none, e.g. inference tensors).
Seen = tuple[Identity, int | None]


def identity_of(tensor: torch.Tensor) -> Identity:
    """Which memory ``tensor`` is a view of, and how (equal for ``p`` and ``p.detach()``)."""
    return (
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
        str(tensor.device),
    )


def version_of(tensor: torch.Tensor) -> int | None:
    """The tensor's version counter, ``None`` where it has none."""
    try:
        return int(tensor._version)
    except RuntimeError:  # inference tensors do not track versions
        return None


def local_of(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2's parameters), the tensor itself otherwise:
    the memory and version counter a snapshot can actually observe."""
    if not torch.distributed.is_available():  # builds without torch.distributed
        return tensor
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def same_bytes(live: torch.Tensor, saved: torch.Tensor | None) -> bool:
    """Whether ``live`` holds exactly the bytes of ``saved`` (bitwise: ``-0.0`` differs
    from ``0.0``, a NaN equals itself), on whichever device ``live`` is."""
    if saved is None or live.dtype != saved.dtype or live.shape != saved.shape:
        return False
    pair = [t.detach().reshape(-1).contiguous().view(torch.uint8) for t in (live, saved)]
    pair[1] = pair[1].to(pair[0].device)
    # Compared as the widest integers both divide into: 8-byte words compare seven times
    # faster than bytes here. (An offset or a length a word does not divide refuses it.)
    for word in (torch.int64, torch.int32, torch.int16):
        try:
            return torch.equal(pair[0].view(word), pair[1].view(word))
        except RuntimeError:
            continue
    return torch.equal(pair[0], pair[1])


def frozen_identities(state: Mapping[str, Any]) -> set[Identity]:
    """Identities of the frozen parameters (their local shards) of every module in ``state``."""
    frozen: set[Identity] = set()
    for obj in state.values():
        module = unwrap_module(obj)
        if isinstance(module, torch.nn.Module):
            frozen.update(
                identity_of(local_of(p)) for p in module.parameters() if not p.requires_grad
            )
    return frozen


@dataclass(frozen=True)
class History:
    """What the snapshot behind the newest committed checkpoint saw, and which of its
    tensors that checkpoint keeps in the run's shared area (only those can be referenced)."""

    seen: Mapping[str, Seen] = field(default_factory=dict)
    shared: frozenset[str] = frozenset()


class ChangeTracker:
    """Decides, tensor by tensor while a snapshot is taken, what can be reused unread."""

    def __init__(self, state: Mapping[str, Any], history: History) -> None:
        self.frozen_ids: set[Identity] = frozen_identities(state)
        self.history = history
        self.seen: dict[str, Seen] = {}
        self.frozen: set[str] = set()
        self.reused: set[str] = set()

    def observe(self, name: str, tensor: torch.Tensor, identity: Identity) -> bool:
        """Record ``tensor`` under ``name``; whether its bytes are those of the previous
        save (a frozen parameter, same memory, version unchanged), so it needs no copy."""
        seen = (identity, version_of(tensor))
        self.seen[name] = seen
        if identity not in self.frozen_ids:
            return False
        self.frozen.add(name)
        unchanged = (
            seen[1] is not None
            and self.history.seen.get(name) == seen
            and name in self.history.shared
        )
        if unchanged:
            self.reused.add(name)
        return unchanged


@dataclass(frozen=True)
class Changes:
    """What a snapshot learned for an incremental save (see :class:`ChangeTracker`)."""

    seen: dict[str, Seen]
    frozen: frozenset[str]  # frozen parameters
    reused: frozenset[str]  # frozen and unchanged: not copied, the previous bytes stand

    @classmethod
    def of(cls, tracker: ChangeTracker) -> Changes:
        return cls(dict(tracker.seen), frozenset(tracker.frozen), frozenset(tracker.reused))

    def unchanged_since(self, previous: Mapping[str, Seen], names: Iterable[str]) -> set[str]:
        """Of ``names``, those whose memory and version counter did not move (not proof
        that the bytes are equal: a write through ``.data`` is not counted)."""
        return {
            n
            for n in names
            if n in self.seen and self.seen[n][1] is not None and previous.get(n) == self.seen[n]
        }


def holding(
    changes: Changes,
    live: Mapping[str, torch.Tensor],
    saved: Mapping[str, Any],
    holds: Callable[[torch.Tensor, Any], bool] | None = None,
) -> dict[str, Seen]:
    """Of the frozen tensors a snapshot saw (``changes``, ``live``: its tensors by name),
    those holding exactly the bytes of the saved tensor of their name, with what the
    snapshot saw of them: what a restore hands the next incremental save. ``holds``
    compares a live tensor with a saved one (:func:`holds_bytes` by default)."""
    holds = holds or holds_bytes
    return {
        name: changes.seen[name]
        for name in changes.frozen
        if holds(local_of(live[name]), saved.get(name))
    }


def holds_bytes(live: torch.Tensor, saved: torch.Tensor | None) -> bool:
    """Whether ``live`` (local memory) holds exactly the bytes of ``saved``, if any."""
    return same_bytes(live, local_of(saved) if saved is not None else None)

"""Modules and optimizers of a distributed job, through DCP's ``state_dict`` API.

Under ``torch.distributed`` a module may be wrapped by DDP, FSDP1 or FSDP2 (``fully_shard``,
whose parameters are DTensors) or ``torch.compile``; its optimizer's state follows the
parameters' sharding. ``get_model_state_dict`` / ``get_optimizer_state_dict`` hide all of
that: they return the state keyed like the *unwrapped* module (optimizer state by parameter
name, not index), with each rank holding only its own shards. Those state dicts are split
here into a JSON document (every non-tensor leaf: hyper-parameters, param-group layout) and
a flat ``{name: tensor}`` dict that DCP saves and reshards. Nothing is gathered.

The same calls restore, on any world size and in a plain process (full tensors).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from mlflow_ckpt.errors import StateMismatchError, StateSerializationError
from mlflow_ckpt.snapshot.changes import (
    Changes,
    ChangeTracker,
    History,
    Seen,
    holding,
    local_of,
)
from mlflow_ckpt.snapshot.host_buffers import HostBuffers
from mlflow_ckpt.snapshot.tree import TensorSink, decode, encode

MODULE = "module"
OPTIMIZER = "optimizer"


def sharded_entries(state: Mapping[str, Any]) -> dict[str, str]:
    """Which top-level entries go through DCP: modules (``"module"``) and optimizers
    (``"optimizer:<name of the module it optimizes>"``). The rest is saved per rank."""
    modules = {k: v for k, v in state.items() if isinstance(v, torch.nn.Module)}
    out = {k: MODULE for k in modules}
    for name, obj in state.items():
        if not isinstance(obj, torch.optim.Optimizer):
            continue
        params = {id(p) for g in obj.param_groups for p in g["params"]}
        owner = next(
            (k for k, m in modules.items() if params <= {id(p) for p in m.parameters()}), None
        )
        if owner is None:
            raise StateSerializationError(
                f"state[{name!r}] is an optimizer whose parameters belong to no module in the "
                "state; put the module it optimizes in the state too (e.g. state['model'])."
            )
        out[name] = f"{OPTIMIZER}:{owner}"
    return out


def _state_dicts(state: Mapping[str, Any], entries: Mapping[str, str]) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    out: dict[str, Any] = {}
    for name, kind in entries.items():
        if kind == MODULE:
            out[name] = get_model_state_dict(state[name])
        else:
            owner = kind.split(":", 1)[1]
            out[name] = get_optimizer_state_dict(state[owner], state[name])
    return out


class _FlatSink(TensorSink):
    """Names every tensor by its path, keeps DTensors as they are (DCP plans them).

    Incremental saves: a frozen parameter whose local shard did not change since the
    previous save is kept uncopied (see :mod:`.changes`); the writer references its chunks
    without reading them."""

    def add(self, path: str, tensor: torch.Tensor) -> str:
        if path in self.tensors:
            raise StateSerializationError(f"two tensors of the state are both named {path!r}")
        self._keep(path, tensor, local_of(tensor))
        return path


def _host_copy(tensor: torch.Tensor, buffers: HostBuffers | None = None) -> torch.Tensor:
    """A host copy the training may not touch: the local shard of a DTensor, re-wrapped;
    in the previous snapshot's memory when ``buffers`` are given."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        local = _host_copy(tensor.to_local(), buffers)
        return DTensor.from_local(
            local,
            tensor.device_mesh,
            tensor.placements,
            shape=tensor.shape,
            stride=tensor.stride(),
            run_check=False,
        )
    pinned = tensor.device.type == "cuda"
    shape = tuple(tensor.shape)
    if buffers is not None:
        out = buffers.take(shape, tensor.dtype, pinned)
    else:
        out = torch.empty(shape, dtype=tensor.dtype, pin_memory=pinned)
    out.copy_(tensor.detach(), non_blocking=pinned)
    return out


@dataclass
class ShardedSnapshot:
    """The sharded part of one rank's state: structure as JSON, tensors flat by name."""

    entries: dict[str, str]
    document: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    changes: Changes | None = None  # incremental saves: frozen and unchanged tensors


def take_sharded(
    state: Mapping[str, Any],
    entries: Mapping[str, str],
    *,
    copy: bool,
    buffers: HostBuffers | None = None,
    history: History | None = None,
) -> ShardedSnapshot:
    """Collect the sharded entries of ``state``; ``copy`` makes host copies (async saves),
    into ``buffers`` (the previous snapshot's memory) when given. ``history`` (incremental
    saves: what the previous save saw) lets frozen, unchanged parameters go uncopied."""
    tracker = (
        ChangeTracker({k: state[k] for k in entries}, history) if history is not None else None
    )
    sink = _FlatSink(
        (lambda t: _host_copy(t, buffers)) if copy else (lambda t: t.detach()),
        tracker.observe if tracker is not None else None,
    )
    dicts = _state_dicts(state, entries)
    document = {name: encode(sd, name, sink) for name, sd in dicts.items()}
    if any(t.device.type == "cuda" for t in sink.tensors.values()) and copy:
        torch.cuda.synchronize()
    changes = Changes.of(tracker) if tracker is not None else None
    return ShardedSnapshot(dict(entries), document, sink.tensors, changes)


def frozen_holding_sharded(
    state: Mapping[str, Any], entries: Mapping[str, str], loaded: Mapping[str, torch.Tensor]
) -> dict[str, Seen]:
    """The frozen parameters of the sharded entries whose local shards hold exactly what a
    distributed resume loaded into ``loaded`` (by flat name), with what a snapshot taken
    now sees of them: the sharded counterpart of ``snapshot.frozen_holding``. Handed to the
    next incremental save, it lets that save reference the frozen chunks unread, as every
    later save does, instead of hashing the whole frozen state once more after a resume.
    (torch < 2.10's FSDP2 moves a padded shard to new memory at the first forward, so there a
    rank whose frozen shard is padded hashes it once more: slower, the same bytes.)"""
    now = take_sharded(state, entries, copy=False, history=History())
    assert now.changes is not None
    return holding(now.changes, now.tensors, loaded)


def empty_targets(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fresh buffers shaped (and sharded) like ``tensors``: a load lands here first, so the
    live state is only touched once every rank has read everything."""
    from torch.distributed.tensor import DTensor

    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if isinstance(t, DTensor):
            out[name] = DTensor.from_local(
                torch.empty_like(t.to_local()),
                t.device_mesh,
                t.placements,
                shape=t.shape,
                stride=t.stride(),
                run_check=False,
            )
        else:
            out[name] = torch.empty_like(t)
    return out


def check_against(
    live: ShardedSnapshot, saved: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], where: str
) -> None:
    """Refuse a checkpoint whose sharded tensors do not fit the live ones (names, global
    shapes, dtypes) before anything is loaded."""
    missing = sorted(set(live.tensors) - set(saved))
    unexpected = sorted(set(saved) - set(live.tensors))
    mismatched = [
        f"{name} (checkpoint {saved[name][0]}{list(saved[name][1])}, "
        f"state {t.dtype}{list(t.shape)})"
        for name, t in live.tensors.items()
        if name in saved and (saved[name][0] != t.dtype or tuple(t.shape) != saved[name][1])
    ]
    if missing or unexpected or mismatched:
        shown = "; ".join(
            f"{label}: {', '.join(names[:10])}"
            for label, names in (
                ("missing from the checkpoint", missing),
                ("unexpected", unexpected),
                ("mismatched", mismatched),
            )
            if names
        )
        raise StateMismatchError(
            f"The sharded state does not match checkpoint {where}; nothing was restored. "
            f"{shown}. Restore into a model and optimizer built like the ones that were saved.",
            missing=missing,
            unexpected=unexpected,
            mismatched=mismatched,
        )


def decode_sharded(
    document: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
) -> dict[str, Any]:
    """The saved state dicts (by entry name), tensors taken from ``tensors``."""
    return {name: decode(node, tensors, name) for name, node in document.items()}


def apply_sharded(
    state: Mapping[str, Any], entries: Mapping[str, str], dicts: Mapping[str, Any]
) -> None:
    """Load saved state dicts into the live modules and optimizers (modules first)."""
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    for name, kind in entries.items():
        if kind == MODULE and name in state:
            set_model_state_dict(state[name], dicts[name])
    for name, kind in entries.items():
        if kind != MODULE and name in state:
            owner = kind.split(":", 1)[1]
            set_optimizer_state_dict(state[owner], state[name], dicts[name])

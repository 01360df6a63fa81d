"""Take an in-memory snapshot of the whole training state, and restore one.

The snapshot is the only part of a save that runs on the training thread: every tensor is
copied to host memory (pinned, asynchronously, for CUDA tensors) and the rest is encoded to
JSON. After that the training loop may change its tensors freely while the background worker
encodes, hashes and uploads the copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from mlflow_ckpt.codec import STRUCTURE_FILE
from mlflow_ckpt.errors import (
    CheckpointCorruptedError,
    StateMismatchError,
    StateSerializationError,
)
from mlflow_ckpt.snapshot.changes import Changes, ChangeTracker, History, Seen, holding
from mlflow_ckpt.snapshot.direct import holds
from mlflow_ckpt.snapshot.host_buffers import HostBuffers
from mlflow_ckpt.snapshot.restore_plan import restore_into
from mlflow_ckpt.snapshot.rng import capture_rng, check_rng, restore_rng
from mlflow_ckpt.snapshot.stateful import unwrap_module
from mlflow_ckpt.snapshot.tree import SavedTensors, TensorSink, decode, encode, plain

DOCUMENT_VERSION = 1
RNG_PATH = "_rng"
PROGRESS_PATH = "_progress"


@dataclass
class Snapshot:
    """A host-memory copy of the training state: a JSON document plus its tensors."""

    document: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    # Incremental saves: what was seen of each tensor, and which are reused uncopied
    # (``tensors`` then holds the live tensor, never to be read).
    changes: Changes | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class _HostCopier:
    """Copies tensors to contiguous host memory; CUDA copies overlap and are synced once.

    With ``copy=False`` (sync saves, where training waits anyway) CPU tensors are used in
    place, saving the time and memory of a copy nobody needs. With ``buffers`` the copies
    land in the previous snapshot's memory (see :mod:`.host_buffers`).
    """

    def __init__(self, copy: bool, buffers: HostBuffers | None = None) -> None:
        self.copy = copy
        self.buffers = buffers
        self.pending_cuda = False

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        on_cpu = tensor.device.type == "cpu"
        if on_cpu and not self.copy:
            return tensor.contiguous()
        pinned = tensor.device.type == "cuda"
        if self.buffers is not None:
            out = self.buffers.take(tuple(tensor.shape), tensor.dtype, pinned)
        elif on_cpu:
            return tensor.clone(memory_format=torch.contiguous_format)
        else:
            out = torch.empty(tuple(tensor.shape), dtype=tensor.dtype, pin_memory=pinned)
        out.copy_(tensor, non_blocking=pinned)
        self.pending_cuda |= pinned
        return out

    def finish(self) -> None:
        if self.pending_cuda:
            torch.cuda.synchronize()


def take_snapshot(
    state: Mapping[str, Any],
    progress: Mapping[str, Any],
    *,
    include_rng: bool = True,
    copy: bool = True,
    buffers: HostBuffers | None = None,
    history: History | None = None,
) -> Snapshot:
    """Copy ``state`` (plus the global RNG streams and ``progress``) into host memory.

    ``copy=False`` shares CPU tensors with the live state: only for a save that completes
    before training touches them again. ``history`` (incremental saves: what the snapshot
    of the newest checkpoint saw) lets frozen, unchanged parameters go uncopied.
    """
    for name in state:
        if not isinstance(name, str) or not name or name == RNG_PATH:
            raise StateSerializationError(
                f"state key {name!r} is not allowed: use non-empty strings other than {RNG_PATH!r}"
            )
    copier = _HostCopier(copy, buffers)
    tracker = ChangeTracker(state, history) if history is not None else None
    sink = TensorSink(copier, tracker.observe if tracker is not None else None)
    encoded = {name: encode(obj, name, sink) for name, obj in state.items()}
    document: dict[str, Any] = {
        "version": DOCUMENT_VERSION,
        "state": encoded,
        "progress": encode(dict(progress), PROGRESS_PATH, sink),
    }
    if include_rng:
        document["rng"] = encode(capture_rng(), RNG_PATH, sink)
    copier.finish()
    return Snapshot(document, sink.tensors, Changes.of(tracker) if tracker is not None else None)


def frozen_holding(state: Mapping[str, Any], saved: SavedTensors) -> dict[str, Seen]:
    """The frozen parameters in ``state`` that hold exactly the bytes of the checkpoint
    tensor of their name (``saved``), with what a snapshot taken now sees of them (memory
    and version counter, by tensor name).

    Called right after a restore: handing this to the next incremental save lets it
    reference the frozen backbone unread until a version counter moves. Without it, the
    first save after a resume copies and hashes every frozen byte to find them unchanged.
    A restore does not always leave the saved bytes (a module whose ``load_state_dict``
    skips some keys or converts what it is given), so each is compared bit for bit, once
    per resume: far less than hashing, and referencing other bytes would store the old
    ones for the new. Nothing is copied, not even from a GPU."""
    tracker = ChangeTracker(state, History())
    sink = TensorSink(lambda tensor: tensor, tracker.observe)
    for name, obj in state.items():
        # Only modules have parameters; another object's state_dict() may be costly (a
        # framework's whole checkpoint), so it is not called. Names are take_snapshot's.
        if isinstance(unwrap_module(obj), torch.nn.Module):
            encode(obj, name, sink)
    return holding(Changes.of(tracker), sink.tensors, saved, holds)


@dataclass(frozen=True)
class DecodedState:
    """A checkpoint's state decoded back into Python objects."""

    state: dict[str, Any]
    rng: dict[str, Any] | None
    progress: dict[str, Any]
    # Entries saved through DCP's state_dict API (distributed checkpoints): name -> kind
    # ("module", or "optimizer:<module>": keyed by parameter name, restored through DCP).
    sharded: dict[str, str] = field(default_factory=dict)
    # The checkpoint's tensors by the names it stores them under, the names a snapshot
    # gives them (what tells a resume which frozen parameters hold the saved bytes).
    tensors: SavedTensors = field(default_factory=dict)


def decode_document(document: Mapping[str, Any], tensors: SavedTensors, where: str) -> DecodedState:
    """Decode a snapshot document read back from a checkpoint."""
    version = document.get("version")
    if version != DOCUMENT_VERSION or not isinstance(document.get("state"), dict):
        raise CheckpointCorruptedError(
            f"{where}: state structure of unknown version {version!r} (or without a state object)",
            path=STRUCTURE_FILE,
        )
    try:
        state = {name: decode(node, tensors, name) for name, node in document["state"].items()}
        rng = decode(document["rng"], tensors, RNG_PATH) if "rng" in document else None
        progress = decode(document.get("progress", {}), tensors, PROGRESS_PATH)
    except CheckpointCorruptedError as exc:
        raise CheckpointCorruptedError(
            f"{where}: {STRUCTURE_FILE}: {exc}", path=STRUCTURE_FILE
        ) from exc
    except RecursionError as exc:
        raise CheckpointCorruptedError(
            f"{where}: {STRUCTURE_FILE} is nested too deeply to be a saved state",
            path=STRUCTURE_FILE,
        ) from exc
    if rng is not None:
        check_rng(rng, where)
    progress = progress if isinstance(progress, dict) else {}
    return DecodedState(state, rng, progress, tensors=dict(tensors))


def restore(
    decoded: DecodedState,
    targets: Mapping[str, Any],
    *,
    strict: bool,
    restore_rng_streams: bool,
    where: str,
) -> None:
    """Restore ``decoded`` into the user's objects, and the RNG streams if asked.

    Optimizer state of a distributed checkpoint is keyed by parameter name: it goes through
    DCP's ``set_optimizer_state_dict`` once everything else is restored.
    """
    by_name = {
        name: kind.split(":", 1)[1]
        for name, kind in decoded.sharded.items()
        if kind.startswith("optimizer:") and name in targets
    }
    if not by_name:
        restore_into(targets, decoded.state, strict=strict, where=where)
    else:
        from mlflow_ckpt.snapshot.sharded import apply_sharded

        for name, owner in by_name.items():
            if owner not in targets:
                raise StateMismatchError(
                    f"Checkpoint {where}: restoring optimizer {name!r} needs its module "
                    f"{owner!r} in the state too; nothing was restored.",
                    missing=[owner],
                )
        rest = {k: v for k, v in targets.items() if k not in by_name}
        saved = {k: v for k, v in decoded.state.items() if k not in by_name}
        restore_into(rest, saved, strict=strict, where=where)
        apply_sharded(targets, {k: decoded.sharded[k] for k in by_name}, decoded.state)
    if restore_rng_streams and decoded.rng is not None:
        restore_rng(decoded.rng)


def plain_state(decoded: DecodedState) -> dict[str, Any]:
    """The whole training state as plain data (for :func:`mlflow_ckpt.load_training_state`)."""
    out: dict[str, Any] = dict(plain(decoded.state))
    if decoded.rng is not None:
        out[RNG_PATH] = decoded.rng
    out[PROGRESS_PATH] = decoded.progress
    return out

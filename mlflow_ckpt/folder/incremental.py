"""Incremental checkpoints: write the tensors that changed, reference the rest.

Each checkpoint of a run still lists every file it needs in its manifest, but the bytes of
tensors that did not change since the previous checkpoint (a frozen backbone, embeddings
that are not trained...) are written once, into the run's **shared area**, and every later
checkpoint references them there instead of copying them.

Where bytes go, tensor by tensor:

- *unchanged* and already in the shared area: referenced (file, offset, hash of the
  previous checkpoint's entry). A frozen parameter whose version counter did not move is
  not even read; any other tensor is compared by the BLAKE3 hash of its bytes.
- *unchanged* (or a frozen parameter) but only in the previous checkpoint's own folder:
  written into this checkpoint's group of the shared area (``@shared/<model id>/``), where
  the next checkpoints can reference it;
- *changed* (its version counter moved, or its hash differs): written into the
  checkpoint's own folder, deleted with it.

So the shared area holds only bytes expected to last, and a checkpoint's own folder only
bytes no other checkpoint needs. The shared area lives under the *run's* artifacts (not a
LoggedModel's), so deleting a checkpoint (and ``mlflow gc`` purging it) never removes bytes
a kept checkpoint references; :mod:`mlflow_ckpt.catalog.shared` deletes a group once no
kept checkpoint references it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from mlflow_ckpt.codec import EncodedFiles, FileEntry, Manifest, TensorEntry
from mlflow_ckpt.codec.hashing import hash_tensor
from mlflow_ckpt.codec.manifest import SHARED_PREFIX, is_shared, shared_group
from mlflow_ckpt.codec.shards import write_shards, write_structure
from mlflow_ckpt.snapshot import Snapshot
from mlflow_ckpt.snapshot.changes import History, Seen
from mlflow_ckpt.storage import Store

logger = logging.getLogger(__name__)

# A checkpoint referencing more groups than this rewrites its unchanged bytes into a group
# of its own: the reference list (a tag on the checkpoint) stays short, and bytes stay
# gathered in a few files.
MAX_GROUPS = 32
# Smaller tensors that are not frozen parameters stay in the checkpoint's own folder (an RNG
# state that did not move, say): a shared file of their own would cost more than their bytes.
MIN_SHARED_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Base:
    """The newest checkpoint a save can reference: its manifest and what its snapshot saw
    of each tensor (empty after a resume: then every tensor is compared by hash)."""

    model_id: str
    manifest: Manifest
    seen: Mapping[str, Seen]

    def history(self) -> History:
        shared = frozenset(t.name for t in self.manifest.tensors if is_shared(t.file))
        return History(dict(self.seen), shared)


@dataclass
class Plan:
    """What one incremental save writes where, and what it references."""

    referenced: dict[str, TensorEntry]
    shared: dict[str, torch.Tensor]  # into this checkpoint's group of the shared area
    own: dict[str, torch.Tensor]  # into the checkpoint's own folder
    digests: dict[str, str]
    hashed_bytes: int = 0


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def plan_incremental(snapshot: Snapshot, base: Base | None) -> Plan:
    """Decide, for every tensor of ``snapshot``, whether it is referenced or written where."""
    changes = snapshot.changes
    frozen = changes.frozen if changes is not None else frozenset()
    reused = changes.reused if changes is not None else frozenset()
    previous = {t.name: t for t in base.manifest.tensors} if base is not None else {}
    seen_before = base.seen if base is not None else {}
    steady = (
        changes.unchanged_since(seen_before, snapshot.tensors) if changes is not None else set()
    )
    plan = Plan({}, {}, {}, {})
    for name, tensor in snapshot.tensors.items():
        entry = previous.get(name)
        if entry is None or entry.dtype != _dtype(tensor) or entry.shape != tuple(tensor.shape):
            _write(plan, name, tensor, lasting=name in frozen)
            continue
        if name in reused and is_shared(entry.file):
            plan.referenced[name] = entry  # frozen, version unchanged: not read at all
            continue
        moved = name in seen_before and name not in steady
        small = entry.nbytes < MIN_SHARED_BYTES and not is_shared(entry.file)
        if name not in frozen and (moved or small):
            plan.own[name] = tensor  # changed (its version counter moved), or too small
            continue
        digest = hash_tensor(tensor)
        plan.hashed_bytes += entry.nbytes
        plan.digests[name] = digest
        if digest == entry.digest and is_shared(entry.file):
            plan.referenced[name] = entry
        elif digest == entry.digest or name in steady or name in frozen:
            plan.shared[name] = tensor  # lasting bytes: where the next save can reference them
        else:
            plan.own[name] = tensor
    groups = {shared_group(e.file) for e in plan.referenced.values()}
    if len(groups) > MAX_GROUPS:
        logger.info(
            "Incremental save references %d shared groups (> %d): rewriting its unchanged "
            "tensors into one group",
            len(groups),
            MAX_GROUPS,
        )
        for name, entry in plan.referenced.items():
            plan.shared[name] = snapshot.tensors[name]
            if entry.digest is not None:
                plan.digests[name] = entry.digest
        plan.referenced = {}
    return plan


def _write(plan: Plan, name: str, tensor: torch.Tensor, *, lasting: bool) -> None:
    if lasting:  # a frozen parameter: hashed once now, so a resumed run can compare it
        plan.digests[name] = hash_tensor(tensor)
        plan.hashed_bytes += tensor.numel() * tensor.element_size()
        plan.shared[name] = tensor
    else:
        plan.own[name] = tensor


def write_incremental(
    store: Store,
    snapshot: Snapshot,
    base: Base | None,
    *,
    model_id: str,
    format: str,
    max_shard_bytes: int,
    compression: str | None,
    compression_level: int,
) -> tuple[EncodedFiles, bool]:
    """Write the changed tensors of ``snapshot`` into ``store`` (a routed store: own folder
    plus ``@shared/``); return the files and index (references included) and whether a
    shared group was written."""
    plan = plan_incremental(snapshot, base)
    options = {
        "format": format,
        "max_shard_bytes": max_shard_bytes,
        "compression": compression,
        "compression_level": compression_level,
        "digests": plan.digests,
    }
    shared = write_shards(store, plan.shared, directory=f"{SHARED_PREFIX}{model_id}", **options)
    own = write_shards(store, plan.own, **options)
    structure = write_structure(store, snapshot.document)
    referenced_files: list[FileEntry] = []
    if plan.referenced:
        assert base is not None
        for path in sorted({e.file for e in plan.referenced.values()}):
            referenced_files.append(base.manifest.file(path))
    files = (*referenced_files, *shared.files, *own.files, structure)
    index = (*plan.referenced.values(), *shared.tensors, *own.tensors)
    logger.debug(
        "Incremental save %s: %d tensors referenced, %d written to the shared area, %d to "
        "its own folder (%d bytes hashed)",
        model_id,
        len(plan.referenced),
        len(plan.shared),
        len(plan.own),
        plan.hashed_bytes,
    )
    return EncodedFiles(files, tuple(index)), bool(plan.shared)

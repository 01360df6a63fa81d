"""The folder of a checkpoint written by several ranks.

```
MLmodel
state.json                       rank 0: the progress, and the structure of the sharded
                                 state dicts (modules, optimizers) with tensor references
shards/rank-00000-00.bin ...     the sharded tensors, written by every rank in parallel
shards/metadata.json             where each saved chunk lies (JSON; see codec/dcp_metadata.py)
ranks/00000/state.json           rank 0's own state: RNG streams, sampler, scheduler, extras
ranks/00000/tensors-...          ... and its tensors
ranks/00001/...                  rank 1's
manifest.json                    written last by rank 0: every rank's files, sizes, SHA-256
```
Each rank writes only its own files (:func:`write_rank_files`); rank 0 writes the rest once
every rank reported its files (:func:`write_root`). In a plain process,
:func:`read_distributed` assembles full tensors from the shards through DCP's planner.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mlflow_ckpt.codec import (
    STRUCTURE_FILE,
    FileEntry,
    Manifest,
    TensorEntry,
    check_file,
    read_state,
    verify_files,
    write_file,
    write_manifest,
    write_state,
)
from mlflow_ckpt.codec.hashing import HashingWriter
from mlflow_ckpt.codec.manifest import (
    DISTRIBUTED_FORMAT_VERSION,
    format_version_for,
    is_shared,
    shared_group,
)
from mlflow_ckpt.errors import CheckpointCorruptedError
from mlflow_ckpt.folder.writer import FolderSpec, library_versions, write_model_files
from mlflow_ckpt.snapshot import DecodedState, Snapshot, decode_document
from mlflow_ckpt.snapshot.sharded import MODULE, ShardedSnapshot, decode_sharded
from mlflow_ckpt.snapshot.stateful import STATE_DICT, StatefulValue
from mlflow_ckpt.storage import Store
from mlflow_ckpt.storage.prefix import PrefixStore

ROOT_VERSION = 1


def rank_dir(rank: int) -> str:
    return f"ranks/{rank:05d}"


@dataclass(frozen=True)
class RankFiles:
    """What one rank wrote: its files and the index of its own tensors (folder-relative)."""

    files: tuple[FileEntry, ...]
    tensors: tuple[TensorEntry, ...]
    shard_bytes: int = 0  # what its DCP chunks hold, uncompressed

    def to_json(self) -> dict[str, Any]:
        return {
            "shard_bytes": self.shard_bytes,
            "files": [[f.path, f.size, f.digest, f.algorithm] for f in self.files],
            "tensors": [
                [t.name, t.dtype, list(t.shape), t.file, t.offset, t.nbytes] for t in self.tensors
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RankFiles:
        return cls(
            tuple(FileEntry(p, s, h, a) for p, s, h, a in data["files"]),
            tuple(TensorEntry(n, d, tuple(s), f, o, b) for n, d, s, f, o, b in data["tensors"]),
            int(data.get("shard_bytes", 0)),
        )


def write_rank_files(store: Store, rank: int, own: Snapshot, spec: FolderSpec) -> RankFiles:
    """Write this rank's own (not sharded) state under ``ranks/<rank>/``."""
    prefix = rank_dir(rank)
    encoded = write_state(
        PrefixStore(store, prefix),
        own.document,
        own.tensors,
        format=spec.format,
        max_shard_bytes=spec.max_shard_bytes,
        compression=spec.compression,
        compression_level=spec.compression_level,
    )
    return RankFiles(
        tuple(replace(f, path=f"{prefix}/{f.path}") for f in encoded.files),
        tuple(
            replace(t, name=f"{prefix}/{t.name}", file=f"{prefix}/{t.file}")
            for t in encoded.tensors
        ),
    )


def write_root(
    store: Store,
    sharded: ShardedSnapshot,
    progress: Mapping[str, Any],
    spec: FolderSpec,
    ranks: Sequence[RankFiles],
    *,
    model_id: str,
    run_id: str,
    step: int,
    epoch: int | None,
    metrics: Mapping[str, float],
    triggers: Sequence[str],
    created_at: float | None = None,
    before_manifest: Any = None,
    shared_uri: str | None = None,
) -> Manifest:
    """On rank 0, once every rank wrote its files: ``state.json``, ``MLmodel``, manifest.

    With ``shared_uri`` (incremental saves) ranks may list files of the run's shared area."""
    root = {
        "version": ROOT_VERSION,
        "world_size": len(ranks),
        "sharded": sharded.entries,
        "state": sharded.document,
        "progress": progress,
    }
    structure = write_file(
        store, STRUCTURE_FILE, json.dumps(root, separators=(",", ":"), allow_nan=False).encode()
    )
    model_files = write_model_files(store, spec, model_id=model_id, run_id=run_id)
    store.flush()
    files = (structure, *model_files, *_unique(f for r in ranks for f in r.files))
    shared = [f for f in files if is_shared(f.path)]
    manifest = Manifest(
        format=spec.format,
        step=step,
        epoch=epoch,
        metrics=dict(metrics),
        created_at=time.time() if created_at is None else created_at,
        files=files,
        tensors=tuple(t for r in ranks for t in r.tensors),
        structure_file=STRUCTURE_FILE,
        triggers=tuple(triggers),
        versions=library_versions(),
        format_version=format_version_for(files, DISTRIBUTED_FORMAT_VERSION, spec.compression),
        world_size=len(ranks),
        compression=spec.compression,
        shared_uri=shared_uri if shared else None,
        shared_group=model_id if any(shared_group(f.path) == model_id for f in shared) else None,
    )
    if spec.compression or shared:  # the files no longer tell the logical size
        manifest = replace(manifest, logical_bytes=_logical_bytes(manifest, ranks))
    if before_manifest is not None:
        before_manifest()
    write_manifest(store, manifest)
    store.flush()
    return manifest


def _unique(files: Iterable[FileEntry]) -> list[FileEntry]:
    """Each file once (ranks may all reference the same shared file)."""
    seen: dict[str, FileEntry] = {}
    for entry in files:
        seen.setdefault(entry.path, entry)
    return list(seen.values())


def _logical_bytes(manifest: Manifest, ranks: Sequence[RankFiles]) -> int:
    """Every file at its uncompressed size: the chunks' raw bytes, the tensors' bytes."""
    tensor_files = {t.file for t in manifest.tensors}
    other = sum(
        f.size
        for f in manifest.files
        if f.path not in tensor_files and not f.path.rpartition("/")[2].startswith("rank-")
    )
    return other + sum(t.nbytes for t in manifest.tensors) + sum(r.shard_bytes for r in ranks)


def rank_manifest(manifest: Manifest, rank: int) -> Manifest:
    """The part of a distributed manifest that describes one rank's own files, with the
    ``ranks/<rank>/`` prefix removed, so the single-process decoder reads it."""
    prefix = f"{rank_dir(rank)}/"
    files = tuple(
        replace(f, path=f.path.removeprefix(prefix))
        for f in manifest.files
        if f.path.startswith(prefix)
    )
    tensors = tuple(
        replace(t, name=t.name.removeprefix(prefix), file=t.file.removeprefix(prefix))
        for t in manifest.tensors
        if t.file.startswith(prefix)
    )
    return replace(manifest, files=files, tensors=tensors, structure_file=STRUCTURE_FILE)


@dataclass(frozen=True)
class RootDocument:
    """``state.json`` of a distributed checkpoint."""

    world_size: int
    sharded: dict[str, str]
    state: dict[str, Any]
    progress: dict[str, Any]


def read_root(local: Path, where: str) -> RootDocument:
    try:
        doc = json.loads(local.read_bytes())
        if doc.get("version") != ROOT_VERSION:
            raise ValueError(f"unknown version {doc.get('version')!r}")
        sharded = {str(k): str(v) for k, v in doc["sharded"].items()}
        if not isinstance(doc["state"], dict) or set(doc["state"]) != set(sharded):
            raise ValueError("the sharded entries and their structure differ")
        return RootDocument(int(doc["world_size"]), sharded, doc["state"], dict(doc["progress"]))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointCorruptedError(
            f"{where}: {STRUCTURE_FILE} is not a distributed checkpoint's structure ({exc})",
            path=STRUCTURE_FILE,
        ) from exc


def read_rank(
    store: Store, manifest: Manifest, rank: int, scratch: Path, where: str
) -> DecodedState:
    """Verify and decode one rank's own state."""
    own = rank_manifest(manifest, rank)
    local = verify_files(PrefixStore(store, rank_dir(rank)), own, scratch / rank_dir(rank), where)
    document, tensors = read_state(own, local, where)
    return decode_document(document, tensors, f"{where} (rank {rank})")


def shard_files(manifest: Manifest) -> dict[str, FileEntry]:
    return {f.path: f for f in manifest.files if f.path.startswith("shards/") or is_shared(f.path)}


def read_distributed(store: Store, manifest: Manifest, scratch: Path, where: str) -> DecodedState:
    """In one plain process: the full training state (full tensors for sharded entries,
    rank 0's own state for the rest). Every file read is verified first."""
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    from mlflow_ckpt.codec.dcp_metadata import saved_tensors
    from mlflow_ckpt.codec.dcp_store import StoreReader

    local = verify_files(store, manifest, scratch, where, [STRUCTURE_FILE])
    root = read_root(local[STRUCTURE_FILE], where)
    reader = StoreReader(store, scratch, where, shard_files(manifest))
    metadata = reader.read_metadata()
    full: dict[str, torch.Tensor] = {
        name: torch.empty(tuple(md.size), dtype=md.properties.dtype)
        for name, md in saved_tensors(metadata).items()
    }
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp_load(full, storage_reader=reader, no_dist=True)
    dicts = decode_sharded(root.state, full)
    own = read_rank(store, manifest, 0, scratch, where)
    state = dict(own.state)
    for name, kind in root.sharded.items():
        state[name] = StatefulValue(STATE_DICT, dicts[name]) if kind == MODULE else dicts[name]
    return DecodedState(state, own.rng, root.progress, sharded=root.sharded)


def copy_shared_shards(
    own: Store, store: Store, manifest: Manifest, scratch: Path, where: str
) -> Manifest:
    """A distributed checkpoint made self-contained: the shard files it references in the
    run's shared area copied (verified) into ``shards/``, and ``metadata.json`` rewritten
    to point there under a new name (the old one stays valid until the manifest swap).

    ``store`` reads the checkpoint (its folder and the shared area), ``own`` is written."""
    from mlflow_ckpt.codec.dcp_metadata import METADATA_FILE, SELF_CONTAINED_METADATA

    renamed: dict[str, str] = {}
    copies: list[FileEntry] = []
    for entry in manifest.files:
        if not is_shared(entry.path):
            continue
        new = f"shards/{shared_group(entry.path)}-{entry.path.rpartition('/')[2]}"
        local = check_file(store, entry, scratch, where)
        with local.open("rb") as source, own.open_writer(new) as raw:
            writer = HashingWriter(raw, entry.algorithm)
            while chunk := source.read(16 * 1024 * 1024):
                writer.write(chunk)
        copies.append(FileEntry(new, writer.size, writer.digest, writer.algorithm))
        renamed[entry.path] = new
    old_meta = manifest.file(METADATA_FILE)
    doc = json.loads(check_file(store, old_meta, scratch, where).read_bytes())
    for tensor in doc["tensors"].values():
        for chunk in tensor["chunks"]:
            chunk["file"] = renamed.get(chunk["file"], chunk["file"])
    meta = write_file(own, SELF_CONTAINED_METADATA, json.dumps(doc, sort_keys=True).encode())
    files = (
        *(f for f in manifest.files if not is_shared(f.path) and f.path != METADATA_FILE),
        *copies,
        meta,
    )
    return replace(
        manifest,
        files=files,
        shared_uri=None,
        shared_group=None,
        format_version=format_version_for(files, DISTRIBUTED_FORMAT_VERSION, manifest.compression),
    )

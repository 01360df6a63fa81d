"""``torch.distributed.checkpoint`` (DCP) storage over a :class:`Store`, without pickle.

DCP plans *which* rank writes *which* piece of a sharded (or replicated) tensor and, on
load, which saved pieces each rank needs for its own shards, whatever the new world size.
That planning is what we use it for. Its own ``FileSystemWriter``/``Reader`` would not do
for us: they pickle the checkpoint's ``.metadata`` (and ``pickle.load`` it back), write only
to a file system, and hash nothing. So this module is the storage half:

```
shards/rank-00000-00.bin     raw tensor bytes written by rank 0 (one file per writer thread)
shards/rank-00001-00.bin     ... by rank 1
shards/metadata.json         every tensor's dtype, global shape and chunks, and where each
                             chunk's bytes lie - plain JSON (see :mod:`.dcp_metadata`)
```
Incremental saves reference the chunks of frozen parameters untouched since the previous
save unread; they hash every other chunk. One unchanged since the previous checkpoint is
referenced where that one stored it in the run's shared area (``@shared/<model id>/``), or
written there so the next save can (a frozen one goes there at once); changed chunks go to
the checkpoint's own ``shards/``.
With ``compression="zstd"`` each chunk is stored as a small ``.ztensors`` blob (byte planes,
checksummed zstd frames: :mod:`.zstd_io`) at its offset, marked ``"codec": "zstd"`` in the
metadata; it is decoded (with every bomb check) and its shape checked before use.
Every file is written through ``Store.open_writer`` (atomic, on every store) and hashed
while it is written; the :class:`FileEntry` list goes into the checkpoint's manifest. On
load every file is verified against the manifest before a byte of it is used.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    Metadata,
    MetadataIndex,
    StorageMeta,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from mlflow_ckpt.codec import zstd_io
from mlflow_ckpt.codec.dcp_metadata import (
    CHUNK_NAME,
    METADATA_FILE,
    SHARDS_DIR,
    ChunkBase,
    ChunkLocation,
    chunk_key,
    metadata_from_json,
    metadata_to_json,
)
from mlflow_ckpt.codec.hashing import HashingWriter, hash_tensor
from mlflow_ckpt.codec.layout import check_file
from mlflow_ckpt.codec.manifest import FileEntry, is_shared
from mlflow_ckpt.errors import CheckpointCorruptedError, StateSerializationError
from mlflow_ckpt.storage import Store


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (host memory, contiguous, any dtype, 0-d included)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    # (numpy's stubs declare ndarray.__buffer__ on Python >= 3.12 only: PEP 688)
    return memoryview(flat.view(torch.uint8).numpy())  # pyright: ignore[reportArgumentType]


def _nbytes(item: WriteItem) -> int:
    """The raw size of the chunk a write item stands for (from the plan, without its data)."""
    props = item.tensor_data
    if props is None:
        return 0
    n = 1
    for d in props.chunk.sizes:
        n *= d
    return n * props.properties.dtype.itemsize


def _narrowed(tensor: torch.Tensor, offsets: Any, lengths: Any) -> torch.Tensor:
    """The part of a stored chunk a read item asks for (public ``narrow``, dim by dim)."""
    for dim, (start, length) in enumerate(zip(offsets, lengths, strict=True)):
        if start != 0 or length != tensor.size(dim):
            tensor = tensor.narrow(dim, start, length)
    return tensor


def _balance(items: list[WriteItem], bins: int) -> list[list[WriteItem]]:
    """Split write items into ``bins`` files of similar size (largest first, greedy)."""
    buckets: list[list[WriteItem]] = [[] for _ in range(max(1, bins))]
    filled = [0] * len(buckets)
    for item in sorted(items, key=_nbytes, reverse=True):
        i = filled.index(min(filled))
        buckets[i].append(item)
        filled[i] += _nbytes(item)
    return [b for b in buckets if b]


def _writers(store: Store) -> int:
    """Files (threads) per rank: the store's parallelism shared by the ranks of this node
    (``LOCAL_WORLD_SIZE``, set by torchrun): N ranks already write N files at once."""
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, store.parallel_writes // local_ranks)


class _Resolved:
    """The tensors of one ``write_data`` call, each resolved from the planner once (an
    incremental save resolves and hashes a chunk to sort it, then writes the same one)."""

    def __init__(self, planner: SavePlanner) -> None:
        self._planner = planner
        self._tensors: dict[int, torch.Tensor] = {}
        self.digests: dict[int, str] = {}

    def tensor(self, item: WriteItem) -> torch.Tensor:
        tensor = self._tensors.get(id(item))
        if tensor is None:
            tensor = self._planner.resolve_data(item)
            assert isinstance(tensor, torch.Tensor)
            self._tensors[id(item)] = tensor
        return tensor

    def take(self, item: WriteItem) -> torch.Tensor:
        """The tensor to write, no longer kept here once written."""
        tensor = self._tensors.pop(id(item), None)
        if tensor is None:
            tensor = self._planner.resolve_data(item)
            assert isinstance(tensor, torch.Tensor)
        return tensor

    def digest(self, item: WriteItem) -> str:
        """The chunk's BLAKE3 digest, recorded for the manifest."""
        if id(item) not in self.digests:
            self.digests[id(item)] = hash_tensor(self.tensor(item))
        return self.digests[id(item)]


class StoreWriter(StorageWriter):
    """Writes this rank's share of a DCP save into a :class:`Store`, hashing every file.

    After ``dcp.save`` returns, :attr:`files` holds the entries of the files this rank
    wrote (the coordinator's includes ``metadata.json``).
    """

    def __init__(
        self,
        store: Store | None,
        compression: str | None = None,
        level: int = 1,
        *,
        shared_dir: str | None = None,
        base: ChunkBase | None = None,
        frozen: frozenset[str] = frozenset(),
        reused: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__()
        self.store = store  # None: this rank could not open the store (it still takes part)
        self.compression, self.level = compression, level
        # Incremental saves (see the module's docstring): ``shared_dir`` is a routed store's
        # ``@shared/<model id>``; ``reused``: frozen with the same memory and version.
        self.shared_dir, self.base = shared_dir, base
        self.frozen, self.reused = frozen, reused
        self.files: list[FileEntry] = []
        self.raw_bytes = 0  # what this rank's chunks hold, uncompressed (referenced too)
        self.written: ChunkBase = ChunkBase({}, {})  # the next save's base
        self._lock = threading.Lock()

    def reset(self, checkpoint_id: Any = None) -> None:
        self.files = []

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        import dataclasses

        return [dataclasses.replace(p, storage_data=f"rank-{i:05d}") for i, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        store = self.store
        if store is None:
            raise StateSerializationError("this rank could not open the checkpoint's store")
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                raise StateSerializationError(
                    f"state entry {item.index.fqn!r} is not a tensor; only tensors go through "
                    "the sharded path (everything else is stored as JSON)"
                )
        resolved = _Resolved(planner)
        results: list[WriteResult] = []
        own_items, lasting = list(plan.items), []
        if self.shared_dir is not None:
            own_items, lasting = self._sort(plan.items, resolved, results)
        groups = [
            (f"{SHARDS_DIR}/{plan.storage_data}", own_items),
            (f"{self.shared_dir}/{plan.storage_data}", lasting),
        ]
        jobs = [
            (f"{stem}-{i:02d}.bin", bucket)
            for stem, items in groups
            if items
            for i, bucket in enumerate(_balance(items, _writers(store)))
        ]

        def write(name: str, items: list[WriteItem]) -> list[WriteResult]:
            return self._write_file(store, name, items, resolved)

        if len(jobs) > 1:
            with ThreadPoolExecutor(len(jobs), thread_name_prefix="mlflow-ckpt-dcp") as pool:
                parts = [results, *pool.map(lambda job: write(*job), jobs)]
        else:
            parts = [results, *(write(*job) for job in jobs)]
        future: Future[list[WriteResult]] = Future()
        future.set_result([r for part in parts for r in part])
        return future

    def _sort(
        self, items: list[WriteItem], resolved: _Resolved, results: list[WriteResult]
    ) -> tuple[list[WriteItem], list[WriteItem]]:
        """An incremental save's chunks: those the base already stored in the shared area
        are referenced (into ``results``); the rest are returned as ``(this save's own,
        lasting)``: lasting ones (unchanged since the last save, or frozen) go to the
        shared area, where later saves can reference them."""
        own_items: list[WriteItem] = []
        lasting: list[WriteItem] = []
        for item in items:
            before = self.base.chunks.get(chunk_key(item.index)) if self.base else None
            if self._untouched(item, before):  # frozen and untouched: referenced unread
                assert before is not None
                self._reference(item, before, results, _nbytes(item))
                continue
            tensor = resolved.tensor(item)
            digest = resolved.digest(item)
            same = (
                before is not None
                and before.digest == digest
                and before.sizes == tuple(tensor.shape)
                and before.dtype == tensor.dtype
            )
            if same and before is not None and is_shared(before.file):
                self._reference(item, before, results, tensor.numel() * tensor.element_size())
            elif same or item.index.fqn in self.frozen:
                lasting.append(item)
            else:
                own_items.append(item)
        return own_items, lasting

    def _untouched(self, item: WriteItem, before: ChunkLocation | None) -> bool:
        """Whether ``item`` is a frozen chunk whose version counter did not move since the
        base stored it in the shared area: referenced without reading or hashing it."""
        return (
            item.index.fqn in self.reused
            and before is not None
            and is_shared(before.file)
            and item.tensor_data is not None
            and before.sizes == tuple(item.tensor_data.chunk.sizes)
            and before.dtype == item.tensor_data.properties.dtype
        )

    def _write_file(
        self, store: Store, name: str, items: list[WriteItem], resolved: _Resolved
    ) -> list[WriteResult]:
        """Write ``items`` one after another into one file, hashing as it goes; record it."""
        results = []
        with store.open_writer(name) as raw:
            writer = HashingWriter(raw)
            raw_bytes = 0
            for item in items:
                tensor = resolved.take(item)
                offset = writer.size
                if self.compression == "zstd":
                    chunk = tensor.detach().cpu().contiguous()
                    zstd_io.write(writer, [(CHUNK_NAME, chunk)], level=self.level)
                else:
                    writer.write(_bytes_of(tensor))
                raw_bytes += tensor.numel() * tensor.element_size()
                location = ChunkLocation(
                    name,
                    offset,
                    writer.size - offset,
                    tuple(tensor.shape),
                    tensor.dtype,
                    self.compression,
                    resolved.digests.get(id(item)),
                )
                results.append(WriteResult(item.index, writer.size - offset, location))
        entry = FileEntry(name, writer.size, writer.digest, writer.algorithm)
        with self._lock:
            self.files.append(entry)
            self.raw_bytes += raw_bytes
            for result in results:
                self._written(result.index, result.storage_data, entry)
        return results

    def _reference(
        self, item: WriteItem, before: ChunkLocation, results: list[WriteResult], nbytes: int
    ) -> None:
        """Record a chunk of this save as the bytes the base stored in the shared area."""
        assert self.base is not None
        results.append(WriteResult(item.index, before.length, before))
        self.raw_bytes += nbytes
        self._written(item.index, before, self.base.files[before.file])

    def _written(self, index: MetadataIndex, location: ChunkLocation, entry: FileEntry) -> None:
        """Record where a chunk of this save lies (for the next save's comparison)."""
        self.written.chunks[chunk_key(index)] = location
        if entry.path not in self.written.files:
            self.written.files[entry.path] = entry
            if entry not in self.files and is_shared(entry.path):
                self.files.append(entry)  # a referenced file: listed in this manifest too

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """On the coordinator: write ``metadata.json`` (JSON, never pickle)."""
        locations = {r.index: r.storage_data for rank in results for r in rank}
        data = metadata_to_json(metadata, locations).encode()
        assert self.store is not None  # write_data raised on a rank without one
        with self.store.open_writer(METADATA_FILE) as raw:
            writer = HashingWriter(raw)
            writer.write(data)
        with self._lock:
            self.files.append(
                FileEntry(METADATA_FILE, writer.size, writer.digest, writer.algorithm)
            )

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False

    def storage_meta(self) -> StorageMeta | None:
        return None


class StoreReader(StorageReader):
    """Reads a DCP save back from a :class:`Store`, verifying each file before using it.

    ``files`` are the manifest's entries: a file is fetched and its size and hash checked
    once, the first time a chunk in it is needed.
    """

    def __init__(
        self, store: Store, scratch: Path, where: str, files: Mapping[str, FileEntry]
    ) -> None:
        super().__init__()
        self.store, self.scratch, self.where, self.files = store, scratch, where, files
        self._verified: dict[str, Path] = {}
        self._lock = threading.Lock()
        self.locations: dict[MetadataIndex, Any] = {}

    def _local(self, rel_path: str) -> Path:
        with self._lock:
            if rel_path in self._verified:
                return self._verified[rel_path]
        entry = self.files.get(rel_path)
        if entry is None:
            raise CheckpointCorruptedError(
                f"{self.where}: {rel_path} is not listed in the manifest", path=rel_path
            )
        path = check_file(self.store, entry, self.scratch, self.where)
        with self._lock:
            self._verified[rel_path] = path
        return path

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        # A promoted (self-contained) checkpoint lists a rewritten metadata file instead.
        listed = [p for p in self.files if p.startswith(f"{SHARDS_DIR}/metadata")]
        name = METADATA_FILE if METADATA_FILE in self.files or len(listed) != 1 else listed[0]
        data = self._local(name).read_bytes()
        metadata, self.locations = metadata_from_json(data, self.where)
        return metadata

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        self.locations = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        per_file: dict[str, list[Any]] = {}
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                raise CheckpointCorruptedError(
                    f"{self.where}: non-tensor entry {item.storage_index.fqn!r} in the shards"
                )
            per_file.setdefault(self.locations[item.storage_index].file, []).append(item)
        files = sorted(per_file)
        workers = max(1, min(self.store.parallelism, len(files)))
        with ThreadPoolExecutor(workers, thread_name_prefix="mlflow-ckpt-read") as pool:
            local = dict(zip(files, pool.map(self._local, files), strict=True))
        for name in files:
            with open(local[name], "rb") as f:
                for item in per_file[name]:
                    where = self.locations[item.storage_index]
                    target = planner.resolve_tensor(item).detach()
                    f.seek(where.offset)
                    raw = bytearray(where.length)
                    if f.readinto(raw) != where.length:
                        raise CheckpointCorruptedError(
                            f"{self.where}: {name} ends before the chunk of "
                            f"{item.storage_index.fqn!r}",
                            path=name,
                        )
                    chunk = self._chunk(raw, where, name, item.storage_index.fqn)
                    piece = _narrowed(chunk, item.storage_offsets, item.lengths)
                    if target.size() != piece.size():
                        raise CheckpointCorruptedError(
                            f"{self.where}: chunk of {item.storage_index.fqn!r} is "
                            f"{list(piece.size())}, the target needs {list(target.size())}"
                        )
                    target.copy_(piece)
                    planner.commit_tensor(item, target)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _chunk(self, raw: bytearray, where: ChunkLocation, name: str, fqn: str) -> torch.Tensor:
        """The chunk stored in ``raw``: its bytes, or its decoded ``.ztensors`` blob."""
        if where.codec == "zstd":
            decoded, _ = zstd_io.read_buffer(
                torch.frombuffer(raw, dtype=torch.uint8), name, self.where
            )
            chunk = decoded.get(CHUNK_NAME)
            if chunk is None or chunk.dtype != where.dtype or tuple(chunk.shape) != where.sizes:
                raise CheckpointCorruptedError(
                    f"{self.where}: the compressed chunk of {fqn!r} in {name} does not hold "
                    f"a {where.dtype} tensor of shape {list(where.sizes)}",
                    path=name,
                )
            return chunk
        if not raw:
            return torch.empty(where.sizes, dtype=where.dtype)
        return torch.frombuffer(raw, dtype=where.dtype).reshape(where.sizes)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False

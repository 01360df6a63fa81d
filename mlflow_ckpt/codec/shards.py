"""Writing tensor shards: how a checkpoint's tensors become files in a store.

Tensors are grouped, in order, into shards of at most ``max_shard_bytes`` (safetensors,
``.pt``, or zstd-compressed ``.ztensors``), hashed as they are written and written several
at a time where the store allows. An incremental save writes two groups of shards (its own
folder and the run's shared area) with the same function.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from mlflow_ckpt.codec import safetensors_io, zstd_io
from mlflow_ckpt.codec.hashing import HashingWriter
from mlflow_ckpt.codec.layout import (
    DEFAULT_MAX_SHARD_BYTES,
    FORMAT_CODECS,
    STRUCTURE_FILE,
    check_format,
)
from mlflow_ckpt.codec.manifest import FileEntry, TensorEntry
from mlflow_ckpt.errors import StateSerializationError
from mlflow_ckpt.storage import Store


def plan_shards(
    tensors: Mapping[str, torch.Tensor], max_shard_bytes: int
) -> list[list[tuple[str, torch.Tensor]]]:
    """Group tensors, in order, into shards of at most ``max_shard_bytes`` each.

    A single tensor larger than the limit gets a shard of its own.
    """
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    filled = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and filled + nbytes > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append((name, tensor))
        filled += nbytes
    return shards if shards[0] else []


@dataclass(frozen=True)
class EncodedFiles:
    """What :func:`write_state` wrote: file entries and the tensor index."""

    files: tuple[FileEntry, ...]
    tensors: tuple[TensorEntry, ...]


def write_state(
    store: Store,
    document: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    *,
    format: str,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    on_bytes: Callable[[int], None] | None = None,
    compression: str | None = None,
    compression_level: int = zstd_io.DEFAULT_LEVEL,
) -> EncodedFiles:
    """Write the structure file and the tensor shards of one checkpoint to ``store``.

    With ``compression="zstd"`` the shards are ``.ztensors`` files (see ``zstd_io``)."""
    shards = write_shards(
        store,
        tensors,
        format=format,
        max_shard_bytes=max_shard_bytes,
        on_bytes=on_bytes,
        compression=compression,
        compression_level=compression_level,
    )
    return EncodedFiles((*shards.files, write_structure(store, document)), shards.tensors)


def write_shards(
    store: Store,
    tensors: Mapping[str, torch.Tensor],
    *,
    format: str,
    directory: str = "",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    on_bytes: Callable[[int], None] | None = None,
    compression: str | None = None,
    compression_level: int = zstd_io.DEFAULT_LEVEL,
    digests: Mapping[str, str] | None = None,
) -> EncodedFiles:
    """Write ``tensors`` as shard files (under ``directory``, if given) of at most
    ``max_shard_bytes`` each, several at once where the store allows; ``digests`` (tensor
    hashes the caller computed) go into the index."""
    extension, module = FORMAT_CODECS[check_format(format)]
    encode: Callable[[Any, Sequence[tuple[str, torch.Tensor]]], list[int | None]] = module.write
    if compression == "zstd":
        extension = zstd_io.EXTENSION
        encode = functools.partial(zstd_io.write, level=compression_level)
    if format == "safetensors":
        bad = sorted(
            {str(t.dtype) for t in tensors.values() if not safetensors_io.supports(t.dtype)}
        )
        if bad:
            raise StateSerializationError(
                f"safetensors cannot store tensors of dtype {', '.join(bad)}; "
                "use format='torch' for this state."
            )
    shards = plan_shards(tensors, max_shard_bytes)
    folder = f"{directory.rstrip('/')}/" if directory else ""
    digests = digests or {}

    def write_shard(number: int) -> tuple[FileEntry, list[TensorEntry]]:
        items = shards[number - 1]
        name = f"{folder}tensors-{number:05d}-of-{len(shards):05d}{extension}"
        with store.open_writer(name) as raw:
            writer = HashingWriter(raw)
            offsets = encode(writer, items)
        entries = [
            TensorEntry(
                name=tname,
                dtype=str(tensor.dtype).removeprefix("torch."),
                shape=tuple(tensor.shape),
                file=name,
                offset=offset,
                nbytes=tensor.numel() * tensor.element_size(),
                digest=digests.get(tname),
            )
            for (tname, tensor), offset in zip(items, offsets, strict=True)
        ]
        if on_bytes is not None:
            on_bytes(writer.size)
        return FileEntry(name, writer.size, writer.digest, writer.algorithm), entries

    numbers = range(1, len(shards) + 1)
    workers = min(store.parallel_writes, len(shards))
    if workers > 1:
        with ThreadPoolExecutor(workers, thread_name_prefix="mlflow-ckpt-shard") as pool:
            written = list(pool.map(write_shard, numbers))  # in shard order; first error raised
    else:
        written = [write_shard(n) for n in numbers]
    files: list[FileEntry] = []
    index: list[TensorEntry] = []
    for entry, entries in written:
        files.append(entry)
        index.extend(entries)
    return EncodedFiles(tuple(files), tuple(index))


def write_structure(store: Store, document: Mapping[str, Any]) -> FileEntry:
    """Write the state's structure (JSON; tensors are references by name)."""
    encoded = json.dumps(document, separators=(",", ":"), allow_nan=False).encode()
    return write_file(store, STRUCTURE_FILE, encoded)


def write_file(store: Store, rel_path: str, data: bytes) -> FileEntry:
    """Write a small extra file (``MLmodel``...) and return its manifest entry."""
    with store.open_writer(rel_path) as raw:
        writer = HashingWriter(raw)
        writer.write(data)
    return FileEntry(rel_path, writer.size, writer.digest, writer.algorithm)

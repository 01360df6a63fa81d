"""The JSON side of a DCP save: where each chunk of each tensor lies, and its hash.

``shards/metadata.json`` replaces DCP's pickled ``.metadata``: every tensor's dtype, global
shape and chunks, and for each chunk its file, offset, stored length, codec (``"zstd"``
when compressed) and BLAKE3 hash (incremental saves compare it with the next save's chunk).
Parsing is strict: unknown versions, codecs, paths outside the checkpoint and lengths that
do not match a chunk's shape are refused.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from mlflow_ckpt.codec.manifest import MAX_INT, FileEntry, check_hex, check_relpath, is_shared
from mlflow_ckpt.errors import CheckpointCorruptedError, StateSerializationError

SHARDS_DIR = "shards"
CHUNK_NAME = "chunk"  # the one tensor of a compressed chunk's blob
METADATA_FILE = f"{SHARDS_DIR}/metadata.json"
SELF_CONTAINED_METADATA = f"{SHARDS_DIR}/metadata-self-contained.json"
METADATA_VERSION = 1


@dataclass(frozen=True)
class ChunkLocation:
    """Where the bytes of one saved chunk lie, and its shape (to rebuild it on load)."""

    file: str
    offset: int
    length: int  # stored bytes (the raw size unless compressed)
    sizes: tuple[int, ...]
    dtype: torch.dtype
    codec: str | None = None  # "zstd": a .ztensors blob holding the chunk
    digest: str | None = None  # BLAKE3 of the chunk's raw bytes (incremental saves)


@dataclass
class ChunkBase:
    """What one rank's chunks were in the previous checkpoint: where each lies and its
    hash, and the entries of those files (an incremental save references them)."""

    chunks: dict[tuple[str, tuple[int, ...]], ChunkLocation]
    files: dict[str, FileEntry]

    def shared_names(self) -> frozenset[str]:
        """Tensors every chunk of which (on this rank) lies in the run's shared area: only
        those can be referenced by a later save without being read."""
        names: dict[str, bool] = {}
        for (fqn, _), location in self.chunks.items():
            names[fqn] = names.get(fqn, True) and is_shared(location.file)
        return frozenset(name for name, shared in names.items() if shared)


def chunk_key(index: MetadataIndex) -> tuple[str, tuple[int, ...]]:
    return index.fqn, tuple(index.offset or ())


def metadata_to_json(metadata: Metadata, locations: Mapping[MetadataIndex, Any]) -> str:
    """Serialize what a load needs from DCP's metadata: tensors, chunks, byte locations."""
    tensors: dict[str, Any] = {}
    for fqn, md in sorted(metadata.state_dict_metadata.items()):
        if not isinstance(md, TensorStorageMetadata):
            raise StateSerializationError(f"state entry {fqn!r} is not a tensor")
        chunks = []
        for chunk in md.chunks:
            where = locations[MetadataIndex(fqn, chunk.offsets)]
            chunks.append(
                {
                    "offsets": list(chunk.offsets),
                    "sizes": list(chunk.sizes),
                    "file": where.file,
                    "offset": where.offset,
                    "length": where.length,
                    **({"codec": where.codec} if where.codec else {}),
                    **({"blake3": where.digest} if where.digest else {}),
                }
            )
        tensors[fqn] = {
            "dtype": str(md.properties.dtype).removeprefix("torch."),
            "size": list(md.size),
            "chunks": chunks,
        }
    return json.dumps({"version": METADATA_VERSION, "tensors": tensors}, sort_keys=True)


def _dtype(name: Any) -> torch.dtype:
    value = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return value


def _ints(values: Any, what: str) -> tuple[int, ...]:
    if not isinstance(values, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_INT for v in values
    ):
        raise ValueError(f"{what} is not a list of integers from 0 to 2**63-1")
    return tuple(values)


def _chunk(
    fqn: str, c: Any, dtype: torch.dtype, size: tuple[int, ...], where: str
) -> tuple[ChunkStorageMetadata, ChunkLocation]:
    """One chunk entry: inside its tensor (DCP's own save-plan check; a chunk outside it
    would fail deep inside DCP's load instead of here), with a stored length that matches
    its shape unless compressed."""
    offsets, sizes = _ints(c["offsets"], "offsets"), _ints(c["sizes"], "sizes")
    if len(offsets) != len(size) or len(sizes) != len(size):
        raise ValueError(f"chunk of {fqn!r} has the wrong number of dimensions")
    if any(o + s > d for o, s, d in zip(offsets, sizes, size, strict=True)):
        raise ValueError(f"chunk of {fqn!r} at {list(offsets)} lies outside its {list(size)}")
    n = dtype.itemsize * math.prod(sizes)
    offset, length = _ints([c["offset"], c["length"]], "offset/length")
    codec = c.get("codec")
    if codec not in (None, "zstd"):
        raise ValueError(f"chunk of {fqn!r} has unknown codec {codec!r}")
    if codec is None and length != n:
        raise ValueError(f"chunk of {fqn!r} holds {length} bytes, expected {n}")
    digest = None if c.get("blake3") is None else check_hex(c["blake3"])
    location = ChunkLocation(
        check_relpath(c["file"], where), offset, length, sizes, dtype, codec, digest
    )
    return ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)), location


def _tensor(
    fqn: str, md: Any, where: str, locations: dict[MetadataIndex, Any]
) -> TensorStorageMetadata:
    """One tensor entry; its chunks' locations go into ``locations``. Its chunks must fill
    it (DCP's save-plan check: their volumes add up to the tensor's; 0-d tensors aside),
    so a tiny file cannot announce a tensor that a load would allocate in full."""
    dtype, size = _dtype(md["dtype"]), _ints(md["size"], "size")
    chunks = []
    for c in _list(md["chunks"], "chunks"):
        chunk, location = _chunk(fqn, c, dtype, size, where)
        key = MetadataIndex(fqn, chunk.offsets)
        if key in locations:
            raise ValueError(f"two chunks of {fqn!r} start at {list(chunk.offsets)}")
        chunks.append(chunk)
        locations[key] = location
    if size and sum(math.prod(c.sizes) for c in chunks) != math.prod(size):
        raise ValueError(f"the chunks of {fqn!r} do not fill its {list(size)}")
    return TensorStorageMetadata(TensorProperties(dtype=dtype), torch.Size(size), chunks)


def saved_tensors(metadata: Metadata) -> dict[str, TensorStorageMetadata]:
    """The tensor entries of ``metadata``: of a save parsed by :func:`metadata_from_json`,
    all of them (our saves hold no DCP byte entries; this only tells the type checker)."""
    return {
        name: md
        for name, md in metadata.state_dict_metadata.items()
        if isinstance(md, TensorStorageMetadata)
    }


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"{what} is a {type(value).__name__}, not a list")
    return value


def metadata_from_json(data: bytes, where: str) -> tuple[Metadata, dict[MetadataIndex, Any]]:
    """Parse ``metadata.json`` strictly into DCP's ``Metadata`` and the chunk locations."""
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("version") != METADATA_VERSION:
            version = doc.get("version") if isinstance(doc, dict) else None
            raise ValueError(f"unknown metadata version {version!r}")
        locations: dict[MetadataIndex, Any] = {}
        tensors = doc["tensors"]
        if not isinstance(tensors, dict):
            raise TypeError(f"tensors is a {type(tensors).__name__}, not an object")
        # (DCP's Metadata is typed for tensor and byte entries alike; ours are all tensors)
        state: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {
            fqn: _tensor(fqn, md, where, locations) for fqn, md in tensors.items()
        }
    except CheckpointCorruptedError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as exc:
        raise CheckpointCorruptedError(
            f"{where}: {METADATA_FILE} is malformed ({type(exc).__name__}: {exc})",
            path=METADATA_FILE,
        ) from exc
    return Metadata(state_dict_metadata=state, storage_data=locations), locations

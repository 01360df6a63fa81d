"""Streaming safetensors writer and a validating reader.

``safetensors.torch.save_file`` first turns every tensor into a ``bytes`` object, i.e. a
second full copy of the state in memory. Writing the (simple, documented) layout ourselves
streams each tensor's buffer straight to the file instead: an 8-byte little-endian header
length, a JSON header, then the raw bytes. Reading uses the ``safetensors`` library itself,
whose parser rejects oversized headers and overlapping or out-of-range offsets.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import torch

from mlflow_ckpt.errors import CheckpointCorruptedError

_DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
    torch.complex64: "C64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_ALIGN = 8


def supports(dtype: torch.dtype) -> bool:
    """Whether safetensors can store tensors of ``dtype``."""
    return dtype in _DTYPE_CODES


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a contiguous CPU tensor, without copying."""
    if tensor.numel() == 0:
        return memoryview(b"")
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B")


def write(f: BinaryIO, items: Sequence[tuple[str, torch.Tensor]]) -> list[int]:
    """Write ``items`` (contiguous CPU tensors) as one safetensors file.

    Returns the absolute byte offset of each tensor's data in the file, in ``items`` order.
    """
    if sys.byteorder != "little":  # pragma: no cover - no big-endian CI machine
        raise RuntimeError("safetensors checkpoints are written on little-endian hosts only")
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    start = 0
    relative: list[int] = []
    for name, tensor in items:
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _DTYPE_CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [start, start + nbytes],
        }
        relative.append(start)
        start += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-(8 + len(encoded)) % _ALIGN)
    f.write(len(encoded).to_bytes(8, "little"))
    f.write(encoded)
    for _, tensor in items:
        f.write(tensor_bytes(tensor))
    base = 8 + len(encoded)
    return [base + r for r in relative]


def read(path: Path, where: str) -> dict[str, torch.Tensor]:
    """Load every tensor of a safetensors file, reporting parser errors as corruption."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, ValueError, OSError, RuntimeError) as exc:
        raise CheckpointCorruptedError(
            f"{where}: {path.name} is not a valid safetensors file ({exc})", path=path.name
        ) from exc


_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
OWN_STORAGE_BELOW = 1024 * 1024


def read_buffer(
    data: torch.Tensor, name: str, where: str
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int | None, int]]]:
    """Decode a whole safetensors file already in memory (``uint8``, verified): tensors that
    are views of ``data`` (no copy), and each one's ``(absolute offset, byte count)``.

    The same checks as the safetensors library's parser, on the bytes that were hashed (not
    a later re-read): a bounded JSON header, known dtypes, byte counts that match the
    shapes, and data offsets that tile the body exactly, in order, without overlap.
    """

    def bad(reason: str) -> CheckpointCorruptedError:
        return CheckpointCorruptedError(
            f"{where}: {name} is not a valid safetensors file ({reason})", path=name
        )

    total = data.numel()
    if total < 8:
        raise bad("shorter than its 8-byte header length")
    length = int.from_bytes(data[:8].numpy().tobytes(), "little")
    if length > MAX_HEADER_BYTES or 8 + length > total:
        raise bad(f"header length {length} is larger than the file or the 100 MB limit")
    try:
        header = json.loads(data[8 : 8 + length].numpy().tobytes())
    except (ValueError, RecursionError) as exc:
        raise bad(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    base = 8 + length
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = _CODE_DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"] if isinstance(d, int) and d >= 0]
            start, end = info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise bad(f"entry {key!r} has no valid dtype, shape and data_offsets") from None
        if len(shape) != len(info["shape"]) or not all(
            isinstance(o, int) and not isinstance(o, bool) for o in (start, end)
        ):
            raise bad(f"entry {key!r} has a malformed shape or offsets")
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = math.prod(shape) * itemsize
        if not 0 <= start <= end or end - start != nbytes:
            raise bad(f"{key!r} spans bytes {start}-{end}, its dtype and shape need {nbytes}")
        spans.append((start, end, key, dtype, shape, itemsize))
    spans.sort()
    position = 0
    for start, end, key, *_ in spans:
        if start != position:
            raise bad(f"{key!r} starts at {start}, not where the previous tensor ends")
        position = end
    if base + position != total:
        raise bad(f"the tensors cover {position} bytes of a {total - base}-byte body")
    tensors: dict[str, torch.Tensor] = {}
    offsets: dict[str, tuple[int | None, int]] = {}
    for start, end, key, dtype, shape, itemsize in spans:
        raw = data[base + start : base + end]
        if (base + start) % itemsize or end - start < OWN_STORAGE_BELOW:
            # misaligned for its dtype, or small: a tensor of its own. Some consumers
            # (``Generator.set_state``) misread views that start inside a larger storage.
            raw = raw.clone()
        tensors[key] = raw.view(dtype).reshape(shape)
        offsets[key] = (base + start, end - start)
    return tensors, offsets


def data_offsets(path: Path) -> dict[str, tuple[int | None, int]]:
    """``{name: (absolute offset of its data, byte count)}`` from a file's header.

    Call after :func:`read` succeeded: the header is then known to be valid.
    """
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    base = 8 + length
    return {
        name: (base + info["data_offsets"][0], info["data_offsets"][1] - info["data_offsets"][0])
        for name, info in header.items()
        if name != "__metadata__"
    }

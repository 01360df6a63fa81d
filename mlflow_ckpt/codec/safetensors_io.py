"""Streaming safetensors writer and a validating reader.

``safetensors.torch.save_file`` first turns every tensor into a ``bytes`` object, i.e. a
second full copy of the state in memory. Writing the (simple, documented) layout ourselves
streams each tensor's buffer straight to the file instead: an 8-byte little-endian header
length, a JSON header, then the raw bytes. Reading parses that layout too, once, strictly, on
the bytes that were hashed (:func:`read_buffer`): the checks of the ``safetensors`` library's
own parser (bounded header, known dtypes, offsets that tile the body), with no second parse
of a re-read file. A differential test holds it to ``safetensors.torch.load`` on valid files.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from mlflow_ckpt.codec.hashing import ByteSink
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
Offset = tuple[int | None, int]  # (absolute offset of a tensor's data, byte count)


def supports(dtype: torch.dtype) -> bool:
    """Whether safetensors can store tensors of ``dtype``."""
    return dtype in _DTYPE_CODES


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a contiguous CPU tensor, without copying."""
    if tensor.numel() == 0:
        return memoryview(b"")
    # (numpy's stubs declare ndarray.__buffer__ on Python >= 3.12 only: PEP 688)
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B")  # pyright: ignore[reportArgumentType]


def write(f: ByteSink, items: Sequence[tuple[str, torch.Tensor]]) -> list[int]:
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


_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
OWN_STORAGE_BELOW = 1024 * 1024
MAX_INT64 = 2**63 - 1


def read(path: Path, where: str) -> tuple[dict[str, torch.Tensor], dict[str, Offset]]:
    """Read a safetensors file from ``path`` and decode it with :func:`read_buffer`.

    One parser for every safetensors file we load: the verified in-memory buffers of a
    normal load and the files a distributed rank reads from its own folder go through the
    same checks."""
    raw = bytearray(path.read_bytes())
    data = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    return read_buffer(data, path.name, where)


def read_buffer(
    data: torch.Tensor, name: str, where: str
) -> tuple[dict[str, torch.Tensor], dict[str, Offset]]:
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

    header, base = _header(data, bad)
    spans = sorted(_span(key, info, bad) for key, info in header.items() if key != "__metadata__")
    _check_tiling(spans, data.numel() - base, bad)
    tensors: dict[str, torch.Tensor] = {}
    offsets: dict[str, Offset] = {}
    for span in spans:
        tensors[span.key] = _view(data, base, span)
        offsets[span.key] = (base + span.start, span.end - span.start)
    return tensors, offsets


class _Span(NamedTuple):
    """One tensor's entry in the header, checked; sorts by where its bytes start."""

    start: int
    end: int
    key: str
    dtype: torch.dtype
    shape: list[int]


def _header(data: torch.Tensor, bad: Callable[[str], Exception]) -> tuple[dict[str, Any], int]:
    """The parsed JSON header and where the body starts, both bounded by the file."""
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
    return header, 8 + length


def _span(key: str, info: Any, bad: Callable[[str], Exception]) -> _Span:
    """One header entry, checked: a known dtype, a shape of counts, integer offsets that
    span exactly the bytes the dtype and shape need."""
    try:
        dtype = _CODE_DTYPES[info["dtype"]]
        shape = info["shape"]
        start, end = info["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise bad(f"entry {key!r} has no valid dtype, shape and data_offsets") from None
    if not isinstance(shape, list) or not all(_count(v) for v in (*shape, start, end)):
        raise bad(f"entry {key!r} has a malformed shape or offsets")
    nbytes = math.prod(shape) * dtype.itemsize
    if start > end or end - start != nbytes:
        raise bad(f"{key!r} spans bytes {start}-{end}, its dtype and shape need {nbytes}")
    return _Span(start, end, key, dtype, shape)


def _count(value: Any) -> bool:
    """A JSON integer a tensor can have as a size or offset (torch's sizes are int64)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_INT64


def _check_tiling(spans: list[_Span], body: int, bad: Callable[[str], Exception]) -> None:
    """The spans (sorted) must cover the body exactly: no gap, no overlap, nothing after."""
    position = 0
    for span in spans:
        if span.start != position:
            raise bad(f"{span.key!r} starts at {span.start}, not where the previous tensor ends")
        position = span.end
    if position != body:
        raise bad(f"the tensors cover {position} bytes of a {body}-byte body")


def _view(data: torch.Tensor, base: int, span: _Span) -> torch.Tensor:
    """The tensor of ``span``: a view of ``data``, or a copy of its own when it is small or
    misaligned for its dtype (some consumers, ``Generator.set_state``, misread views that
    start inside a larger storage)."""
    raw = data[base + span.start : base + span.end]
    if (base + span.start) % span.dtype.itemsize or span.end - span.start < OWN_STORAGE_BELOW:
        raw = raw.clone()
    return raw.view(span.dtype).reshape(span.shape)

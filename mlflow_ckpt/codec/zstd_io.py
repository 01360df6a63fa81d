"""Compressed tensor files (``.ztensors``): byte-grouped zstd blocks, streamed, bounded memory.

The format (byte layout, index fields, plane split, frame codecs, limits and every check a
reader makes before allocating) is specified in ``docs/reference/ztensors.md``. In short:
each 4 MiB block of a floating-point tensor is split into byte planes, because exponents
compress and mantissas do not; a plane is one zstd frame (with its checksum) or stored as
is; a JSON index, its length and a magic end the file. Blocks are compressed on several
threads and written in order as they finish: memory holds a few blocks, never a second
copy.
"""

from __future__ import annotations

import json
import math
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, overload

import numpy as np
import torch
import zstandard

from mlflow_ckpt.codec.hashing import ByteSink
from mlflow_ckpt.codec.planar import PlanarTensor
from mlflow_ckpt.codec.planes import merge as merge_planes
from mlflow_ckpt.codec.planes import split as split_planes
from mlflow_ckpt.codec.planes import workers as plane_workers
from mlflow_ckpt.codec.safetensors_io import _DTYPE_CODES, MAX_INT64
from mlflow_ckpt.errors import CheckpointCorruptedError

EXTENSION = ".ztensors"
MAGIC = b"MLCKZST1"
BLOCK_BYTES = 4 * 1024 * 1024
MAX_INDEX_BYTES = 100 * 1024 * 1024
# A zstd block of at most 128 KiB costs at least 4 bytes (an RLE block): no valid frame
# expands more than this. Anything claiming more is refused unread.
MAX_EXPANSION = 32 * 1024
# A plane is kept compressed only if that saves at least this much of its bytes. At zstd's
# fast levels (below its default, 3) the bar is one bit per byte: decoding a plane that
# saves less (AdamW's second byte planes save ~8%, at ~2.3 GB/s a core here) costs a load
# more time than reading its few saved bytes from a local disk or the page cache. Measured on
# a 604 MB model + AdamW state: 1.2% more bytes, 10% less time to decode (docs/guides/
# compression.md). From level 3 up the caller asks for size: a plane saving 3% stays compressed.
FAST_LEVELS_BELOW = 3
FAST_MIN_SAVING = 1 / 8
MIN_SAVING = 0.03
DEFAULT_LEVEL = 1
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}
_PLANED = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64)


def check_level(level: int) -> int:
    """Validate a zstd compression level (negative levels are zstd's fastest)."""
    low, high = -7, zstandard.MAX_COMPRESSION_LEVEL
    if isinstance(level, bool) or not isinstance(level, int) or not low <= level <= high:
        raise ValueError(f"compression_level={level!r} must be an integer from {low} to {high}")
    return level


def _planes_of(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size() if dtype in _PLANED else 1


def _blocks(flat: torch.Tensor, planes: int) -> Iterator[torch.Tensor]:
    step = max(planes, BLOCK_BYTES // planes * planes)
    for start in range(0, flat.numel(), step):
        yield flat[start : start + step]


class _Encoder:
    """Per-thread zstd compressors (a compressor must not be shared between threads)."""

    def __init__(self, level: int) -> None:
        self._level = level
        self._local = threading.local()
        saving = FAST_MIN_SAVING if level < FAST_LEVELS_BELOW else MIN_SAVING
        self.pays_below = 1.0 - saving

    def compress(self, data: memoryview) -> bytes:
        compressor = getattr(self._local, "c", None)
        if compressor is None:
            compressor = self._local.c = zstandard.ZstdCompressor(
                level=self._level, write_content_size=True, write_checksum=True
            )
        return compressor.compress(data)


def write(
    f: ByteSink, items: Sequence[tuple[str, torch.Tensor]], level: int = DEFAULT_LEVEL
) -> list[int | None]:
    """Write ``items`` (contiguous CPU tensors) as one ``.ztensors`` file.

    Offsets are not meaningful in a compressed file: the manifest records none.
    """
    if sys.byteorder != "little":  # pragma: no cover - no big-endian CI machine
        raise RuntimeError("compressed checkpoints are written on little-endian hosts only")
    encoder = _Encoder(level)
    index: dict[str, Any] = {}
    workers = plane_workers()
    with ThreadPoolExecutor(workers, thread_name_prefix="mlflow-ckpt-zstd") as pool:
        for name, tensor in items:
            planes = _planes_of(tensor.dtype)
            flat = tensor.reshape(-1).view(torch.uint8) if tensor.numel() else None
            blocks: list[Any] = []
            index[name] = {
                "dtype": _DTYPE_CODES[tensor.dtype],
                "shape": list(tensor.shape),
                "planes": planes,
                "blocks": blocks,
            }
            if flat is None:
                continue
            pays: list[bool] | None = None  # decided on the first block
            in_flight: list[Future[_Block]] = []
            for block in _blocks(flat, planes):
                if pays is None:
                    first = _encode(encoder, block, planes, None)
                    pays = [codec == "zstd" for codec, _ in first[1]]
                    _emit(f, blocks, first)
                    continue
                in_flight.append(pool.submit(_encode, encoder, block, planes, pays))
                if len(in_flight) > 2 * workers:  # bounded: a few blocks in memory
                    _emit(f, blocks, in_flight.pop(0).result())
            for future in in_flight:
                _emit(f, blocks, future.result())
    encoded = json.dumps(index, separators=(",", ":")).encode()
    f.write(encoded)
    f.write(len(encoded).to_bytes(8, "little"))
    f.write(MAGIC)
    return [None] * len(items)


_Block = tuple[int, list[tuple[str, "bytes | memoryview"]]]  # raw length, encoded planes


def _encode(encoder: _Encoder, block: torch.Tensor, planes: int, pays: list[bool] | None) -> _Block:
    out: list[tuple[str, bytes | memoryview]] = []
    grouped = split_planes(block.numpy(), planes)
    # (numpy's stubs declare ndarray.__buffer__ on Python >= 3.12 only: PEP 688)
    for i, plane in enumerate(memoryview(g).cast("B") for g in grouped):  # pyright: ignore[reportArgumentType]
        if pays is not None and not pays[i]:
            out.append(("raw", plane))
            continue
        packed = encoder.compress(plane)
        if len(packed) < encoder.pays_below * len(plane):
            out.append(("zstd", packed))
        else:
            out.append(("raw", plane))
    return block.numel(), out


def _emit(f: ByteSink, blocks: list[Any], block: _Block) -> None:
    raw_len, encoded = block
    for _, data in encoded:
        f.write(data)
    blocks.append([raw_len, [[codec, len(data)] for codec, data in encoded]])


# Without ``planar`` every tensor comes back whole.
@overload
def read_buffer(
    data: torch.Tensor, name: str, where: str, planar: None = None
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int | None, int]]]: ...
@overload
def read_buffer(
    data: torch.Tensor, name: str, where: str, planar: Callable[[str], bool] | None
) -> tuple[dict[str, torch.Tensor | PlanarTensor], dict[str, tuple[int | None, int]]]: ...
def read_buffer(
    data: torch.Tensor, name: str, where: str, planar: Callable[[str], bool] | None = None
) -> tuple[dict[str, Any], dict[str, tuple[int | None, int]]]:  # (the overloads say which)
    """Decode a whole ``.ztensors`` file already in memory (``uint8``, verified).

    Tensors whose name ``planar`` accepts, if they are split into planes, come back as
    :class:`PlanarTensor`: every frame decoded, the planes not yet interleaved."""

    def bad(reason: str) -> CheckpointCorruptedError:
        return CheckpointCorruptedError(
            f"{where}: {name} is not a valid compressed tensor file ({reason})", path=name
        )

    total = data.numel()
    if total < 16 or data[-8:].numpy().tobytes() != MAGIC:
        raise bad("no index at its end")
    length = int.from_bytes(data[-16:-8].numpy().tobytes(), "little")
    if length > min(MAX_INDEX_BYTES, total - 16):
        raise bad(f"index length {length} is larger than the file or the 100 MB limit")
    body = total - 16 - length
    try:
        index = json.loads(data[body : body + length].numpy().tobytes())
    except (ValueError, RecursionError) as exc:
        raise bad(f"index is not JSON: {exc}") from None
    if not isinstance(index, dict):
        raise bad("index is not a JSON object")
    plans = [_plan(key, entry, bad) for key, entry in index.items()]
    position = 0
    for plan in plans:
        for _, spans in plan["blocks"]:
            for codec, stored, raw in spans:
                if codec == "zstd" and raw > stored * MAX_EXPANSION:
                    raise bad(f"{plan['key']!r}: a {stored}-byte frame claims {raw} bytes")
                position += stored
    if position != body:
        raise bad(f"the index covers {position} bytes of a {body}-byte body")
    for plan in plans:
        plan["planar"] = plan["planes"] > 1 and planar is not None and planar(plan["key"])
    workers = plane_workers()
    with ThreadPoolExecutor(workers, thread_name_prefix="mlflow-ckpt-unzstd") as pool:
        tensors = _decode_all(data, plans, pool, 2 * workers, bad)
    return tensors, {key: (None, t.numel() * t.element_size()) for key, t in tensors.items()}


def _plan(key: str, entry: Any, bad: Any) -> dict[str, Any]:
    try:
        dtype = _CODE_DTYPES[entry["dtype"]]
        shape = entry["shape"]
        planes = entry["planes"]
        blocks = entry["blocks"]
        if not isinstance(shape, list) or not all(_count(d) for d in shape):
            raise TypeError("shape")
        if planes != _planes_of(dtype) or not isinstance(blocks, list):
            raise TypeError("planes")
        parsed = []
        for raw_len, spans in blocks:
            if not _count(raw_len) or raw_len % planes or raw_len > BLOCK_BYTES:
                raise TypeError("block length")
            if not isinstance(spans, list) or len(spans) != planes:
                raise TypeError("planes of a block")
            plane_len = raw_len // planes
            checked = []
            for codec, stored in spans:
                if codec not in ("zstd", "raw") or not _count(stored):
                    raise TypeError("plane")
                if codec == "raw" and stored != plane_len:
                    raise TypeError("raw plane length")
                checked.append((codec, stored, plane_len))
            parsed.append((raw_len, checked))
    except (KeyError, TypeError, ValueError):
        raise bad(f"entry {key!r} has no valid dtype, shape, planes and blocks") from None
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = math.prod(shape) * itemsize
    if sum(raw for raw, _ in parsed) != nbytes:
        raise bad(f"{key!r}: its blocks hold other than the {nbytes} bytes its shape needs")
    return {"key": key, "dtype": dtype, "shape": shape, "planes": planes, "blocks": parsed}


def _count(value: Any) -> bool:
    """A JSON integer a tensor can have as a size or a length (torch's sizes are int64)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_INT64


def _decode_all(
    data: torch.Tensor, plans: list[dict[str, Any]], pool: ThreadPoolExecutor, ahead: int, bad: Any
) -> dict[str, torch.Tensor | PlanarTensor]:
    """Decode every tensor of a file, block by block on ``pool``'s threads.

    One pool for the whole file, fed blocks across tensor boundaries: small tensors and a
    tensor's last block keep every thread busy. At most ``ahead`` blocks are in flight.
    A block interleaved at once decodes through its thread's scratch block (no memory
    beside the output); the decoded planes of :class:`PlanarTensor` results are kept, as
    they are the output."""
    decoder = _Decoder(data.numpy(), bad)
    decoded: list[tuple[dict[str, Any], torch.Tensor | list[Future[list[np.ndarray]]]]] = []
    in_flight: list[Future[Any]] = []
    offset = 0
    for plan in plans:
        out = (
            None
            if plan["planar"]
            else torch.empty(sum(raw for raw, _ in plan["blocks"]), dtype=torch.uint8)
        )
        blocks: list[Future[list[np.ndarray]]] = []
        written = 0
        for raw_len, spans in plan["blocks"]:
            if out is None:
                blocks.append(pool.submit(decoder.planes, offset, spans, plan["key"], None))
                in_flight.append(blocks[-1])
            else:
                dest = out[written : written + raw_len].numpy()
                in_flight.append(pool.submit(decoder.block, offset, spans, dest, plan["key"]))
            offset += sum(stored for _, stored, _ in spans)
            written += raw_len
            if len(in_flight) > ahead:
                in_flight.pop(0).result()
        decoded.append((plan, blocks if out is None else out))
    for future in in_flight:
        future.result()
    return {
        plan["key"]: (
            out.view(plan["dtype"]).reshape(plan["shape"])
            if isinstance(out, torch.Tensor)
            else PlanarTensor(plan["dtype"], plan["shape"], [b.result() for b in out])
        )
        for plan, out in decoded
    }


class _Decoder:
    """Decodes the blocks of one verified file, on several threads at once.

    Each thread keeps, from one block to the next, its own zstd decompressor (one must not
    be shared between threads, and a new one per frame allocates its context again) and a
    scratch block that decoded planes pass through on their way into the output: a load's
    hundreds of frames then reuse a few buffers, still in the core's cache when they are
    merged, instead of taking new memory (a page fault per 4 KiB) for each frame."""

    def __init__(self, data: np.ndarray, bad: Any) -> None:
        self._data = data
        self._bad = bad
        self._local = threading.local()

    def block(
        self, start: int, spans: list[tuple[str, int, int]], dest: np.ndarray, key: str
    ) -> None:
        """Decode one block into ``dest``: its planes interleaved into it, or, for a
        one-plane block, its frame decoded straight into it."""
        if len(spans) > 1:
            merge_planes(self.planes(start, spans, key, self._scratch()), dest)
            return
        ((codec, stored, _),) = spans
        chunk = self._data[start : start + stored]
        if codec == "raw":
            dest[:] = chunk
        else:
            self._unzstd(chunk, dest, key)

    def planes(
        self, start: int, spans: list[tuple[str, int, int]], key: str, scratch: np.ndarray | None
    ) -> list[np.ndarray]:
        """The planes of one block: zstd ones decoded into ``scratch`` (or new buffers,
        when ``None``: the planes are kept), raw ones views of the verified buffer."""
        grouped: list[np.ndarray] = []
        at = start
        used = 0
        for codec, stored, plane_len in spans:
            chunk = self._data[at : at + stored]
            at += stored
            if codec == "raw":
                grouped.append(chunk)
                continue
            if scratch is None:
                plane = np.empty(plane_len, np.uint8)
            else:
                plane = scratch[used : used + plane_len]
                used += plane_len
            self._unzstd(chunk, plane, key)
            grouped.append(plane)
        return grouped

    def _scratch(self) -> np.ndarray:
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = np.empty(BLOCK_BYTES, np.uint8)
        return scratch

    def _unzstd(self, frame_bytes: np.ndarray, plane: np.ndarray, key: str) -> None:
        """Decode one zstd frame into ``plane``, which must be exactly filled."""
        # (numpy's stubs declare ndarray.__buffer__ on Python >= 3.12 only: PEP 688)
        frame = memoryview(frame_bytes).cast("B")  # pyright: ignore[reportArgumentType]
        size = plane.size
        decompressor = getattr(self._local, "decompressor", None)
        if decompressor is None:
            decompressor = self._local.decompressor = zstandard.ZstdDecompressor()
        try:
            if zstandard.frame_content_size(frame) != size:
                raise zstandard.ZstdError("its header gives another size")
            with decompressor.stream_reader(frame) as reader:
                # (numpy's stubs declare ndarray.__buffer__ on Python >= 3.12 only: PEP 688)
                filled = reader.readinto(memoryview(plane).cast("B"))  # pyright: ignore[reportArgumentType]
                if filled != size or reader.read(1):
                    raise zstandard.ZstdError(f"it decodes to other than {size} bytes")
        except zstandard.ZstdError as exc:
            raise self._bad(f"{key!r}: a zstd frame does not decode ({exc})") from None

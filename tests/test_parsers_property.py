"""Property-based tests (hypothesis) for every parser of untrusted bytes.

A checkpoint's files arrive from a store anyone with write access may have edited, and the
manifest's hashes only vouch for them when the manifest itself is intact. So each parser
must hold on its own, for any bytes:

- **round trip**: whatever our writer writes, the reader gives back (bit for bit for tensors);
- **mutation**: on a damaged file (bit flips, truncation, inserted or deleted bytes, a
  splice of another file, JSON-level edits: wrong types, huge or negative numbers, deep
  nesting) the reader either returns a result that passes a validity check or raises
  :class:`CheckpointCorruptedError`: never another exception type, never a hang (hypothesis'
  deadline, pytest-timeout), and never more memory than a bound proportional to the input
  (Python/NumPy allocations through ``tracemalloc``, torch's own through its profiler).

Parsers here: the tensor files, ``safetensors_io.read_buffer`` and ``zstd_io.read_buffer``;
the JSON ones (manifest, DCP metadata, ``state.json``) are in ``test_parsers_property_json.py``,
the shared checks and mutations in ``propertylib.py``.
Examples are derandomized and no example database is written, so CI runs the same cases
every time; ``MLFLOW_CKPT_PROPERTY_SCALE=10`` runs ten times as many.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import safetensors.torch
import torch
from hypothesis import given
from hypothesis import strategies as st

from mlflow_ckpt.codec import safetensors_io, zstd_io
from mlflow_ckpt.codec.planar import PlanarTensor
from mlflow_ckpt.errors import CheckpointCorruptedError
from tests.propertylib import (
    DEEP_TEXT,
    DTYPES,
    GIB,
    WHERE,
    MiB,
    as_buffer,
    examples,
    mutate_bytes,
    mutate_json,
    parse_hostile,
    safetensors_bytes,
    same_bits,
    tensor_items,
    ztensors_bytes,
)

pytestmark = pytest.mark.timeout(300)


def test_the_memory_check_sees_what_a_parser_allocates() -> None:
    """The instrument itself: a 10-byte input that makes a parser allocate 100 MiB fails
    the bound, whether the memory is a tensor or a Python object; any exception but
    corruption escapes."""
    with pytest.raises(AssertionError, match="bytes of tensors"):
        parse_hostile(lambda raw: torch.empty(100 * MiB, dtype=torch.uint8), b"x" * 10)
    with pytest.raises(AssertionError, match="bytes of Python objects"):
        parse_hostile(lambda raw: bytearray(100 * MiB), b"x" * 10)
    with pytest.raises(OverflowError):
        parse_hostile(lambda raw: int(1e999), b"x")
    assert parse_hostile(lambda raw: torch.empty(10 * MiB), b"x") is not None


# ---------------------------------------------------------------- safetensors


def read_safetensors(raw: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return safetensors_io.read_buffer(as_buffer(raw), "tensors-00001-of-00001.safetensors", WHERE)


def check_safetensors_result(result: Any, raw: bytes) -> None:
    """What an accepted file must be: tensors of storable dtypes whose bytes lie inside the
    file, as the offsets say, and which the safetensors library itself reads the same."""
    tensors, offsets = result
    assert set(tensors) == set(offsets)
    for name, tensor in tensors.items():
        start, nbytes = offsets[name]
        assert tensor.dtype in DTYPES and all(d >= 0 for d in tensor.shape)
        assert tensor.numel() * tensor.element_size() == nbytes
        assert start >= 8 and start + nbytes <= len(raw)
        assert (
            raw[start : start + nbytes]
            == tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    # The library, stricter about ``__metadata__`` (which our reader ignores), must read
    # the same tensors from the same header without it.
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    header.pop("__metadata__", None)
    text = json.dumps(header).encode()
    reference = safetensors.torch.load(len(text).to_bytes(8, "little") + text + raw[8 + length :])
    assert set(reference) == set(tensors)
    assert all(same_bits(reference[k], t) for k, t in tensors.items())


@examples(100)
@given(items=tensor_items())
def test_safetensors_round_trip(items: list[tuple[str, torch.Tensor]]) -> None:
    raw, offsets = safetensors_bytes(items)
    tensors, where = read_safetensors(raw)
    assert set(tensors) == {name for name, _ in items}
    for (name, tensor), offset in zip(items, offsets, strict=True):
        assert same_bits(tensors[name], tensor), name
        assert where[name] == (offset, tensor.numel() * tensor.element_size())
    check_safetensors_result((tensors, where), raw)


@examples(200)
@given(items=tensor_items(), other=tensor_items(), data=st.data())
def test_safetensors_mutations_are_refused_or_valid(
    items: list[tuple[str, torch.Tensor]], other: list[tuple[str, torch.Tensor]], data: Any
) -> None:
    raw, _ = safetensors_bytes(items)
    if data.draw(st.booleans(), label="json-level"):
        length = int.from_bytes(raw[:8], "little")
        text = mutate_json(data, json.loads(raw[8 : 8 + length]))
        mutated = len(text).to_bytes(8, "little") + text + raw[8 + length :]
    else:
        mutated = mutate_bytes(data, raw, safetensors_bytes(other)[0])
    result = parse_hostile(read_safetensors, mutated)
    if result is not None:
        check_safetensors_result(result, mutated)


# ---------------------------------------------------------------- .ztensors


def read_ztensors(raw: bytes, planar: Callable[[str], bool] | None = None) -> Any:
    return zstd_io.read_buffer(as_buffer(raw), "tensors-00001-of-00001.ztensors", WHERE, planar)


def check_ztensors_result(result: Any) -> None:
    """An accepted file: tensors of storable dtypes, as many bytes as the offsets say."""
    tensors, offsets = result
    assert set(tensors) == set(offsets)
    for name, tensor in tensors.items():
        assert isinstance(tensor, torch.Tensor)  # no planar tensors unless asked for
        assert tensor.dtype in DTYPES and all(d >= 0 for d in tensor.shape)
        assert offsets[name] == (None, tensor.numel() * tensor.element_size())


@examples(100)
@given(items=tensor_items(), level=st.sampled_from([-7, 1, 3]), planar=st.booleans())
def test_ztensors_round_trip(
    items: list[tuple[str, torch.Tensor]], level: int, planar: bool
) -> None:
    raw = ztensors_bytes(items, level)
    tensors, offsets = read_ztensors(raw, (lambda name: True) if planar else None)
    assert set(tensors) == {name for name, _ in items}
    for name, tensor in items:
        got = tensors[name]
        if isinstance(got, PlanarTensor):  # planes decoded, not yet interleaved
            assert planar
            got = got.materialize()
        assert same_bits(got, tensor), name
        assert offsets[name] == (None, tensor.numel() * tensor.element_size())


def test_ztensors_round_trip_across_blocks() -> None:
    """A tensor larger than a block (4 MiB): several blocks, the first deciding which
    planes pay; then one flipped bit inside the last block's compressed plane is caught by
    the decoder (zstd's checksum), not returned as a changed value."""
    g = torch.Generator().manual_seed(0)
    big = (torch.randn(1_300_000, generator=g) * 1e-3).to(torch.float32)
    small = torch.arange(10, dtype=torch.int64)
    raw = ztensors_bytes([("big", big), ("small", small)])
    tensors, _ = read_ztensors(raw)
    assert same_bits(tensors["big"], big) and same_bits(tensors["small"], small)
    index = json.loads(raw[-16 - int.from_bytes(raw[-16:-8], "little") : -16])
    blocks = index["big"]["blocks"]
    assert len(blocks) == 2
    at = sum(stored for _, planes in blocks[:-1] for _, stored in planes)
    for codec, stored in blocks[-1][1]:
        if codec == "zstd":
            break
        at += stored
    assert codec == "zstd"  # the exponent plane of small numbers compresses
    damaged = bytearray(raw)
    damaged[at + stored // 2] ^= 0x10
    with pytest.raises(CheckpointCorruptedError, match="zstd frame does not decode"):
        read_ztensors(bytes(damaged))


@examples(200)
@given(items=tensor_items(), other=tensor_items(), data=st.data())
def test_ztensors_mutations_are_refused_or_valid(
    items: list[tuple[str, torch.Tensor]], other: list[tuple[str, torch.Tensor]], data: Any
) -> None:
    raw = ztensors_bytes(items)
    if data.draw(st.booleans(), label="json-level"):
        length = int.from_bytes(raw[-16:-8], "little")
        body = raw[: len(raw) - 16 - length]
        text = mutate_json(data, json.loads(raw[len(body) : len(raw) - 16]))
        mutated = body + text + len(text).to_bytes(8, "little") + zstd_io.MAGIC
    else:
        mutated = mutate_bytes(data, raw, ztensors_bytes(other))
    result = parse_hostile(read_ztensors, mutated, expansion=zstd_io.MAX_EXPANSION)
    if result is not None:
        check_ztensors_result(result)


# ---------------------------------------------------------------- hand-made hostile files


def _safetensors(header: Any, body: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + body


def _ztensors(index: Any, body: bytes = b"") -> bytes:
    text = json.dumps(index).encode()
    return body + text + len(text).to_bytes(8, "little") + zstd_io.MAGIC


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
PARSERS = {
    "safetensors": (read_safetensors, check_safetensors_result, 64),
    "ztensors": (read_ztensors, lambda r, raw: check_ztensors_result(r), zstd_io.MAX_EXPANSION),
}
ALLOWED = lambda exc: False  # noqa: E731
HOSTILE = {
    # safetensors
    "st-length-2**63": ("safetensors", (2**63).to_bytes(8, "little") + b"{}"),
    "st-length-past-end": ("safetensors", (100).to_bytes(8, "little") + b"{}"),
    "st-not-utf8": ("safetensors", (2).to_bytes(8, "little") + b"\xff\xfe"),
    "st-deep": ("safetensors", len(DEEP_TEXT).to_bytes(8, "little") + DEEP_TEXT),
    "st-10-bytes-claim-10GiB": (
        "safetensors",
        _safetensors(
            {"a": {"dtype": "U8", "shape": [10 * GIB], "data_offsets": [0, 10 * GIB]}}, b"x" * 10
        ),
    ),
    "st-negative-offsets": (
        "safetensors",
        _safetensors({"a": {**F32, "data_offsets": [-8, 0]}, "b": F32}, b"x" * 8),
    ),
    "st-overlap": ("safetensors", _safetensors({"a": F32, "b": F32}, b"x" * 8)),
    "st-huge-empty-dim": (
        "safetensors",
        _safetensors({"a": {"dtype": "F32", "shape": [2**64 + 7, 0], "data_offsets": [0, 0]}}),
    ),
    "st-bool-dim": (
        "safetensors",
        _safetensors({"a": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, b"x" * 8),
    ),
    # .ztensors
    "zt-no-magic": ("ztensors", b"\x00" * 32),
    "zt-index-length-2**63": ("ztensors", b"{}" + (2**63).to_bytes(8, "little") + zstd_io.MAGIC),
    "zt-10-byte-frame-claims-10GiB": (
        "ztensors",
        _ztensors(
            {
                "a": {
                    "dtype": "U8",
                    "shape": [10 * GIB],
                    "planes": 1,
                    "blocks": [[10 * GIB, [["zstd", 10]]]],
                }
            },
            b"\x28\xb5\x2f\xfd" + b"\x00" * 6,
        ),
    ),
    "zt-blocks-claim-32k-x-each": (
        "ztensors",
        _ztensors(
            {
                "a": {
                    "dtype": "U8",
                    "shape": [4 * MiB * 3],
                    "planes": 1,
                    "blocks": [[4 * MiB, [["zstd", 64]]]] * 3,
                }
            },
            b"\x00" * 192,
        ),
    ),
    "zt-huge-empty-dim": (
        "ztensors",
        _ztensors({"a": {"dtype": "F32", "shape": [2**64 + 7, 0], "planes": 4, "blocks": []}}),
    ),
    "zt-deep": ("ztensors", DEEP_TEXT + len(DEEP_TEXT).to_bytes(8, "little") + zstd_io.MAGIC),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_file_is_refused_or_valid(case: str) -> None:
    """Hand-made attacks (oversized claims, numbers past int64, deep nesting, non-UTF-8
    headers): refused as corruption within the memory bound, or accepted as a result that
    passes the parser's validity check."""
    kind, raw = HOSTILE[case]
    parse, check, expansion = PARSERS[kind]
    result = parse_hostile(parse, raw, expansion=expansion, allowed=ALLOWED)
    if result is not None:
        check(result, raw)

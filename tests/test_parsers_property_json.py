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

Parsers here: the JSON ones, ``Manifest.from_json``, ``dcp_metadata.metadata_from_json``
and ``state.json`` (``layout.read_state`` + ``snapshot.decode_document``, as
:func:`mlflow_ckpt.folder.reader.read_folder` calls them); the tensor files are in
``test_parsers_property.py``, the shared checks and mutations in ``propertylib.py``.
Examples are derandomized and no example database is written, so CI runs the same cases
every time; ``MLFLOW_CKPT_PROPERTY_SCALE=10`` runs ten times as many.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch.distributed.checkpoint import Metadata
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from mlflow_ckpt.codec.dcp_metadata import ChunkLocation, metadata_from_json, metadata_to_json
from mlflow_ckpt.codec.layout import STRUCTURE_FILE, read_state
from mlflow_ckpt.codec.manifest import (
    FORMAT_VERSION,
    FileEntry,
    Manifest,
    TensorEntry,
)
from mlflow_ckpt.codec.shards import write_state
from mlflow_ckpt.errors import CheckpointError
from mlflow_ckpt.snapshot import decode_document
from mlflow_ckpt.snapshot.snapshot import take_snapshot
from mlflow_ckpt.storage.local import LocalStore
from tests.propertylib import (
    DEEP_TEXT,
    WHERE,
    as_buffer,
    examples,
    mutate_bytes,
    mutate_json,
    parse_hostile,
    same_bits,
    tensors,
)

pytestmark = pytest.mark.timeout(300)


# ---------------------------------------------------------------- manifest.json

SEGMENT = st.text("abcXYZ019_-.", min_size=1, max_size=6).filter(lambda s: s not in (".", ".."))
REL_PATH = st.lists(SEGMENT, min_size=1, max_size=3).map("/".join)
HEX64 = st.binary(min_size=32, max_size=32).map(bytes.hex)
COUNT = st.integers(0, 2**63 - 1)
FLOAT = st.floats(allow_nan=True, allow_infinity=True)
TEXT = st.text(max_size=10)


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    """Any manifest our writer may write: own and shared files, BLAKE3 and SHA-256 entries,
    a tensor index into them, non-finite metrics, every optional field set or not."""
    shared = draw(st.booleans())
    own = draw(st.lists(REL_PATH, min_size=0, max_size=4, unique=True))
    paths = [p for p in own if p != STRUCTURE_FILE] + [STRUCTURE_FILE]
    if shared:
        paths += [
            f"@shared/{p}" for p in draw(st.lists(REL_PATH, min_size=1, max_size=3, unique=True))
        ]
    files = tuple(
        FileEntry(p, draw(COUNT), draw(HEX64), draw(st.sampled_from(["blake3", "sha256"])))
        for p in paths
    )
    names = draw(st.lists(TEXT, max_size=4, unique=True))
    tensors = tuple(
        TensorEntry(
            name=name,
            dtype=draw(st.sampled_from(["float32", "bfloat16", "int8", "bool"]) | TEXT),
            shape=tuple(draw(st.lists(COUNT, max_size=3))),
            file=draw(st.sampled_from(paths)),
            offset=draw(st.none() | COUNT),
            nbytes=draw(COUNT),
            digest=draw(st.none() | HEX64),
        )
        for name in names
    )
    return Manifest(
        format=draw(st.sampled_from(["safetensors", "torch"]) | TEXT),
        step=draw(COUNT),
        epoch=draw(st.none() | COUNT),
        metrics=draw(st.dictionaries(TEXT, FLOAT, max_size=4)),
        created_at=draw(st.floats(allow_nan=False, allow_infinity=False)),
        files=files,
        tensors=tensors,
        structure_file=STRUCTURE_FILE,
        triggers=tuple(draw(st.lists(TEXT, max_size=3))),
        versions=draw(st.dictionaries(TEXT, TEXT, max_size=3)),
        format_version=draw(st.integers(1, FORMAT_VERSION)),
        world_size=draw(st.integers(0, 2**63 - 1)),
        compression=draw(st.sampled_from([None, "zstd"])),
        shared_uri=draw(TEXT) if shared else draw(st.none() | TEXT),
        shared_group=draw(st.none() | TEXT),
        logical_bytes=draw(st.none() | COUNT),
    )


def check_manifest_result(manifest: Manifest) -> None:
    """An accepted manifest can be written again (the promotion and archive paths rewrite
    it) and reads back the same; every path it names can be encoded for a file system."""
    text = manifest.to_json()
    assert Manifest.from_json(text, WHERE).to_json() == text
    for path in [manifest.structure_file, *(f.path for f in manifest.files)]:
        path.encode("utf-8")


def newer_format(exc: Exception) -> bool:
    """A newer format version is not corruption: the reader asks for an upgrade."""
    return type(exc) is CheckpointError and "upgrade mlflow_ckpt" in str(exc)


@examples(100)
@given(manifest=manifests())
def test_manifest_round_trip(manifest: Manifest) -> None:
    text = manifest.to_json()
    parsed = Manifest.from_json(text.encode(), WHERE)
    assert parsed.to_json() == text
    if all(v == v for v in manifest.metrics.values()):  # NaN != NaN
        assert parsed == manifest
    check_manifest_result(parsed)


@examples(200)
@given(manifest=manifests(), other=manifests(), data=st.data())
def test_manifest_mutations_are_refused_or_valid(
    manifest: Manifest, other: Manifest, data: Any
) -> None:
    raw = manifest.to_json().encode()
    if data.draw(st.booleans(), label="json-level"):
        mutated = mutate_json(data, json.loads(raw))
    else:
        mutated = mutate_bytes(data, raw, other.to_json().encode())
    result = parse_hostile(lambda b: Manifest.from_json(b, WHERE), mutated, allowed=newer_format)
    if result is not None:
        check_manifest_result(result)


# ---------------------------------------------------------------- shards/metadata.json (DCP)

DCP_DTYPES = ["float32", "bfloat16", "float16", "int8", "bool", "int64", "uint8", "float64"]


@st.composite
def dcp_metadata(draw: st.DrawFn) -> tuple[Metadata, dict[MetadataIndex, ChunkLocation]]:
    """DCP metadata as a distributed save writes it: each tensor cut along its first
    dimension into chunks that tile it, each chunk at some offset of some file, raw (its
    exact byte count) or zstd-compressed (any stored length), hashed or not."""
    state: dict[str, Any] = {}
    locations: dict[MetadataIndex, ChunkLocation] = {}
    for fqn in draw(st.lists(TEXT, max_size=4, unique=True)):
        dtype = getattr(torch, draw(st.sampled_from(DCP_DTYPES)))
        size = draw(st.lists(st.integers(0, 6), min_size=0, max_size=3))
        cuts = (
            sorted(set(draw(st.lists(st.integers(1, size[0] - 1), max_size=2))))
            if size and size[0] > 1
            else []
        )
        bounds = [0, *cuts, size[0]] if size else [0, 0]
        chunks = []
        for lo, hi in itertools.pairwise(bounds) if size else [(0, 0)]:
            offsets = [lo, *([0] * (len(size) - 1))] if size else []
            sizes = [hi - lo, *size[1:]] if size else []
            codec = draw(st.sampled_from([None, "zstd"]))
            nbytes = math.prod(sizes) * dtype.itemsize
            chunk = ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))
            chunks.append(chunk)
            locations[MetadataIndex(fqn, chunk.offsets)] = ChunkLocation(
                file="shards/" + draw(REL_PATH),
                offset=draw(COUNT),
                length=nbytes if codec is None else draw(COUNT),
                sizes=tuple(sizes),
                dtype=dtype,
                codec=codec,
                digest=draw(st.none() | HEX64),
            )
        state[fqn] = TensorStorageMetadata(TensorProperties(dtype=dtype), torch.Size(size), chunks)
    return Metadata(state_dict_metadata=state), locations


def read_dcp(raw: bytes) -> tuple[Metadata, dict[MetadataIndex, Any]]:
    return metadata_from_json(raw, WHERE)


def check_dcp_result(result: tuple[Metadata, dict[MetadataIndex, Any]]) -> None:
    """Accepted metadata: every chunk inside its tensor, with a location of its dtype whose
    raw length matches its shape; written again it reads back the same."""
    metadata, locations = result
    for fqn, md in metadata.state_dict_metadata.items():
        assert isinstance(md, TensorStorageMetadata)
        assert all(0 <= d < 2**63 for d in md.size)  # what torch can index
        if len(md.size):  # the chunks fill the tensor (DCP's own save-plan check)
            assert sum(math.prod(c.sizes) for c in md.chunks) == math.prod(md.size)
        for chunk in md.chunks:
            assert len(chunk.offsets) == len(chunk.sizes) == len(md.size)
            assert all(
                o + s <= d for o, s, d in zip(chunk.offsets, chunk.sizes, md.size, strict=True)
            )
            where = locations[MetadataIndex(fqn, chunk.offsets)]
            assert where.dtype == md.properties.dtype and where.sizes == tuple(chunk.sizes)
            if where.codec is None:
                assert where.length == math.prod(chunk.sizes) * where.dtype.itemsize
            where.file.encode("utf-8")
    text = metadata_to_json(metadata, locations)
    again = metadata_from_json(text.encode(), WHERE)
    assert metadata_to_json(*again) == text


@examples(100)
@given(saved=dcp_metadata())
def test_dcp_metadata_round_trip(saved: tuple[Metadata, dict[MetadataIndex, Any]]) -> None:
    metadata, locations = saved
    text = metadata_to_json(metadata, locations)
    parsed, parsed_locations = metadata_from_json(text.encode(), WHERE)
    assert parsed.state_dict_metadata == metadata.state_dict_metadata
    assert parsed_locations == locations
    check_dcp_result((parsed, parsed_locations))


@examples(200)
@given(saved=dcp_metadata(), other=dcp_metadata(), data=st.data())
def test_dcp_metadata_mutations_are_refused_or_valid(
    saved: tuple[Metadata, dict[MetadataIndex, Any]],
    other: tuple[Metadata, dict[MetadataIndex, Any]],
    data: Any,
) -> None:
    raw = metadata_to_json(*saved).encode()
    if data.draw(st.booleans(), label="json-level"):
        mutated = mutate_json(data, json.loads(raw))
    else:
        mutated = mutate_bytes(data, raw, metadata_to_json(*other).encode())
    result = parse_hostile(read_dcp, mutated)
    if result is not None:
        check_dcp_result(result)


# ---------------------------------------------------------------- state.json


def real_bools(t: torch.Tensor) -> torch.Tensor:
    """Bool tensors holding only 0 and 1 (what torch makes; other bytes are undefined)."""
    return (t.view(torch.uint8) & 1).view(torch.bool) if t.dtype == torch.bool else t


KEY = st.text(max_size=6)
LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10),
    st.binary(max_size=10),
    st.sampled_from([torch.float32, torch.bfloat16, torch.int8, torch.bool]),
    st.sampled_from([torch.device("cpu"), torch.device("cuda", 1)]),
    st.builds(np.int64, st.integers(-(2**63), 2**63 - 1)),
    st.builds(np.float32, st.floats(width=32)),
    st.builds(np.bool_, st.booleans()),
    tensors().map(real_bools),
    tensors().map(lambda t: real_bools(t).T if t.dim() == 2 else t),  # a non-contiguous view
)
TREES = st.recursive(
    LEAVES,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(KEY, children, max_size=3),  # keys like "__x" take the tagged form
        st.dictionaries(st.integers(-5, 5), children, max_size=3),
    ),
    max_leaves=12,
)


def same_tree(a: Any, b: Any) -> bool:
    """Equal values of equal types, tensors bit for bit, NaN equal to NaN."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and same_bits(a, b)
    if type(a) is not type(b):
        return False
    if isinstance(a, float | np.floating):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, dict):
        return list(a) == list(b) and all(same_tree(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same_tree(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def written_state(state: dict[str, Any], include_rng: bool) -> tuple[Manifest, dict[str, Any]]:
    """A checkpoint's ``state.json`` and tensor files as our writer stores them (a real
    local store), read back into memory: what ``read_state`` gets after verification."""
    snapshot = take_snapshot(state, {"step": 3}, include_rng=include_rng)
    with tempfile.TemporaryDirectory(prefix="props-") as folder:
        root = Path(folder)
        encoded = write_state(
            LocalStore(root.as_uri(), root),
            snapshot.document,
            snapshot.tensors,
            format="safetensors",
        )
        local = {f.path: as_buffer((root / f.path).read_bytes()) for f in encoded.files}
    manifest = Manifest(
        format="safetensors",
        step=3,
        epoch=None,
        metrics={},
        created_at=0.0,
        files=encoded.files,
        tensors=encoded.tensors,
        structure_file=STRUCTURE_FILE,
    )
    return manifest, local


def read_structure(manifest: Manifest, local: dict[str, Any], raw: bytes) -> Any:
    """Decode a checkpoint whose ``state.json`` holds ``raw``, as ``read_folder`` does."""
    document, tensors = read_state(manifest, {**local, STRUCTURE_FILE: as_buffer(raw)}, WHERE)
    return decode_document(document, tensors, WHERE)


@examples(100)
@given(state=st.dictionaries(st.text(min_size=1, max_size=6), TREES, max_size=3), rng=st.booleans())
def test_state_json_round_trip(state: dict[str, Any], rng: bool) -> None:
    assume("_rng" not in state)
    manifest, local = written_state(state, rng)
    python_rng = __import__("random").getstate()
    decoded = read_structure(manifest, local, local[STRUCTURE_FILE].numpy().tobytes())
    assert same_tree(decoded.state, state)
    assert decoded.progress == {"step": 3}
    if rng:
        assert decoded.rng["python"] == python_rng
        assert same_bits(decoded.rng["torch"], torch.get_rng_state())
    else:
        assert decoded.rng is None


@examples(150)
@given(
    state=st.dictionaries(st.text(min_size=1, max_size=6), TREES, min_size=1, max_size=3),
    other=st.dictionaries(st.text(min_size=1, max_size=6), TREES, max_size=2),
    data=st.data(),
)
def test_state_json_mutations_are_refused_or_valid(
    state: dict[str, Any], other: dict[str, Any], data: Any
) -> None:
    assume("_rng" not in state and "_rng" not in other)
    manifest, local = written_state(state, include_rng=data.draw(st.booleans(), label="rng"))
    raw = local[STRUCTURE_FILE].numpy().tobytes()
    if data.draw(st.booleans(), label="json-level"):
        mutated = mutate_json(data, json.loads(raw))
    else:
        splice = take_snapshot(other, {"step": 4}, include_rng=False).document
        mutated = mutate_bytes(data, raw, json.dumps(splice, separators=(",", ":")).encode())
    result = parse_hostile(lambda b: read_structure(manifest, local, b), mutated)
    if result is not None:
        assert isinstance(result.state, dict) and isinstance(result.progress, dict)


# ---------------------------------------------------------------- hand-made hostile files


def _manifest(**edits: Any) -> bytes:
    doc = json.loads(
        Manifest(
            format="safetensors",
            step=1,
            epoch=None,
            metrics={},
            created_at=1.0,
            files=(FileEntry(STRUCTURE_FILE, 2, "0" * 64, "blake3"),),
            tensors=(),
            structure_file=STRUCTURE_FILE,
        ).to_json()
    )
    doc.update(edits)
    return json.dumps(doc).replace('"\\u0000inf"', "1e999").encode()


def _dcp(size: list[int], chunks: list[dict[str, Any]]) -> bytes:
    base = {"file": "shards/a.distcp", "offset": 0, "codec": "zstd", "length": 10}
    entry = {"dtype": "float32", "size": size, "chunks": [{**base, **c} for c in chunks]}
    return json.dumps({"version": 1, "tensors": {"w": entry}}).encode()


def _state(node: Any) -> bytes:
    return json.dumps({"version": 1, "state": {"x": node}, "progress": {}}).encode()


@functools.cache
def empty_state() -> tuple[Manifest, dict[str, Any]]:
    """A checkpoint of an empty state (written once, when a hostile case first needs it)."""
    return written_state({}, include_rng=False)


PARSERS = {
    "manifest": (
        lambda b: Manifest.from_json(b, WHERE),
        lambda r, raw: check_manifest_result(r),
        64,
    ),
    "dcp": (read_dcp, lambda r, raw: check_dcp_result(r), 64),
    "state": (lambda b: read_structure(*empty_state(), b), lambda r, raw: None, 64),
}
ALLOWED = newer_format
HOSTILE = {
    # manifest.json
    "mf-deep": ("manifest", DEEP_TEXT),
    "mf-created-at-inf": ("manifest", _manifest(created_at="\x00inf")),
    "mf-huge-step": ("manifest", _manifest(step=2**64)),
    "mf-5000-digit-step": (
        "manifest",
        _manifest().replace(b'"step": 1', b'"step": 1' + b"0" * 5000),
    ),
    "mf-surrogate-path": (
        "manifest",
        _manifest(
            files=[
                {"path": "\ud800", "size": 1, "blake3": "0" * 64},
                {"path": STRUCTURE_FILE, "size": 1, "blake3": "0" * 64},
            ],
        ),
    ),
    "mf-dotdot": ("manifest", _manifest(structure_file="../x")),
    # shards/metadata.json
    "dcp-deep": ("dcp", DEEP_TEXT),
    "dcp-chunk-outside": ("dcp", _dcp([4], [{"offsets": [3], "sizes": [4]}])),
    "dcp-chunks-do-not-fill": ("dcp", _dcp([10**15], [{"offsets": [0], "sizes": [1]}])),
    "dcp-duplicate-chunks": (
        "dcp",
        _dcp([2], [{"offsets": [0], "sizes": [2]}, {"offsets": [0], "sizes": [1]}]),
    ),
    "dcp-dim-2**64": ("dcp", _dcp([2**64], [{"offsets": [0], "sizes": [2**64]}])),
    "dcp-tensors-list": ("dcp", b'{"version": 1, "tensors": []}'),
    # state.json
    "state-deep": ("state", DEEP_TEXT),
    "state-npscalar-int8-1000": ("state", _state({"__npscalar__": ["|i1", 1000]})),
    "state-npscalar-uint64-negative": ("state", _state({"__npscalar__": ["<u8", -1]})),
    "state-npscalar-int64-1e300": ("state", _state({"__npscalar__": ["<i8", 1e300]})),
    "state-npscalar-int64-inf": ("state", _state({"__npscalar__": ["<i8", {"__float__": "inf"}]})),
    "state-npscalar-object": ("state", _state({"__npscalar__": ["|O", 1]})),
    "state-bad-base64": ("state", _state({"__bytes__": "!!"})),
    "state-unhashable-key": ("state", _state({"__items__": [[[1], 2]]})),
    "state-missing-tensor": ("state", _state({"__tensor__": "nope"})),
    "state-bad-rng": (
        "state",
        json.dumps({"version": 1, "state": {}, "rng": {"python": 1}}).encode(),
    ),
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

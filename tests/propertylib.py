"""Shared parts of the property-based parser tests (``test_parsers_property*.py``).

Reproducible hypothesis settings, the memory and outcome check every hostile parse goes
through, generated tensors, and the mutations (byte-level and JSON-level) applied to valid
files. See ``tests/test_parsers_property.py`` for what is checked and why.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import torch
from hypothesis import HealthCheck, event, note, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from torch.profiler import ProfilerActivity, profile

from mlflow_ckpt.codec import safetensors_io, zstd_io
from mlflow_ckpt.errors import CheckpointCorruptedError

SCALE = float(os.environ.get("MLFLOW_CKPT_PROPERTY_SCALE", "1"))
WHERE = "property test checkpoint"
MiB = 1024 * 1024


def examples(n: int) -> settings:
    """Reproducible settings: derandomized, no ``.hypothesis/`` database, a deadline far
    above a normal parse (seconds, on a shared 2-core machine) that still catches a hang
    long before pytest-timeout would."""
    return settings(
        max_examples=max(1, int(n * SCALE)),
        derandomize=True,
        database=None,
        deadline=10_000,
        print_blob=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ---------------------------------------------------------------- memory and outcome checks


@contextlib.contextmanager
def measured() -> Iterator[dict[str, int]]:
    """Measure what the block allocates: ``python`` = tracemalloc's peak (Python objects and
    NumPy buffers, on every thread), ``torch`` = every byte torch's CPU allocator handed out
    on this thread (an upper bound of its peak: frees are not subtracted). torch's profiler
    does not see a worker thread's tensors: the readers allocate their outputs on the
    calling thread (``zstd_io``'s workers decode into NumPy views of them)."""
    out: dict[str, int] = {}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        tracemalloc.start()  # inside: tracing the profiler's own start costs 100x more
        base = tracemalloc.get_traced_memory()[0]
        try:
            yield out
        finally:
            out["python"] = tracemalloc.get_traced_memory()[1] - base
            tracemalloc.stop()
    out["torch"] = sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())


def parse_hostile(
    parse: Callable[[bytes], Any],
    raw: bytes,
    *,
    expansion: int = 64,
    allowed: Callable[[Exception], bool] = lambda exc: False,
) -> Any:
    """Run ``parse`` on hostile bytes: its result, or ``None`` if it raised
    :class:`CheckpointCorruptedError` naming the checkpoint (any other exception fails the
    test, unless ``allowed`` accepts it). Its allocations must stay below ``expansion``
    times the input plus 64 MiB."""
    with contextlib.suppress(InvalidArgument):  # outside a hypothesis test: no notes
        note(f"input ({len(raw)} bytes): {raw[:2000]!r}")
    result = None
    with measured() as used:
        try:
            result = parse(raw)
        except CheckpointCorruptedError as exc:
            assert WHERE in str(exc), f"the error does not name the checkpoint: {exc}"
        except Exception as exc:
            if not allowed(exc):
                raise
    with contextlib.suppress(InvalidArgument):  # --hypothesis-show-statistics shows the mix
        event("refused" if result is None else "accepted")
    bound = 64 * MiB + expansion * len(raw)
    assert used["python"] <= bound, f"{used['python']} bytes of Python objects for {len(raw)}"
    assert used["torch"] <= bound, f"{used['torch']} bytes of tensors for {len(raw)} bytes"
    return result


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN payloads included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )


def as_buffer(raw: bytes) -> torch.Tensor:
    """Bytes as the readers get them: a writable ``uint8`` tensor (a verified file)."""
    return (
        torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        if raw
        else torch.empty(0, dtype=torch.uint8)
    )


# ---------------------------------------------------------------- generated tensors

DTYPES = sorted(safetensors_io._DTYPE_CODES, key=str)
NAME = st.text(min_size=1, max_size=12).filter(lambda s: s != "__metadata__")
SHAPE = st.lists(st.integers(0, 5), min_size=0, max_size=3)


@st.composite
def tensors(draw: st.DrawFn, dtypes: list[torch.dtype] = DTYPES) -> torch.Tensor:
    """A tensor of any storable dtype and shape (0-d and empty included), filled with
    random bits (NaN payloads, invalid bools), a repeated byte, or zeros: compressible and
    incompressible planes both."""
    dtype = draw(st.sampled_from(dtypes))
    shape = draw(SHAPE)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    fill = draw(st.sampled_from(["random", "byte", "zeros"]))
    if fill == "random":
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**32)))
        raw = torch.randint(0, 256, (nbytes,), generator=g, dtype=torch.uint8)
    else:
        raw = torch.full(
            (nbytes,), draw(st.integers(0, 255)) if fill == "byte" else 0, dtype=torch.uint8
        )
    return raw.view(dtype).reshape(shape)


@st.composite
def tensor_items(draw: st.DrawFn, max_size: int = 6) -> list[tuple[str, torch.Tensor]]:
    names = draw(st.lists(NAME, min_size=0, max_size=max_size, unique=True))
    return [(name, draw(tensors())) for name in names]


def safetensors_bytes(items: list[tuple[str, torch.Tensor]]) -> tuple[bytes, list[int]]:
    buf = io.BytesIO()
    offsets = safetensors_io.write(buf, items)
    return buf.getvalue(), offsets


def ztensors_bytes(items: list[tuple[str, torch.Tensor]], level: int = 1) -> bytes:
    buf = io.BytesIO()
    zstd_io.write(buf, items, level=level)
    return buf.getvalue()


# ---------------------------------------------------------------- mutations

HOSTILE_NUMBERS = [
    -1,
    -(2**63),
    2**31,
    2**32 + 1,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64 + 7,
    10**30,
    1.5,
    -0.0,
    1e308,
    True,
    False,
]
DEEP = "\x00deep\x00"  # replaced in the JSON text by 100,000 nested lists
HUGE = "\x00huge\x00"  # replaced in the JSON text by a 5,000-digit integer
EXPONENT = "\x00exp\x00"  # replaced in the JSON text by 1e999999 (inf)
HOSTILE_VALUES = st.one_of(
    st.sampled_from(HOSTILE_NUMBERS),
    st.sampled_from(
        [None, "", "x", "../../etc/passwd", "/abs", "a\\b", "\udc80", [], {}, [0], {"a": 1}]
    ),
    st.sampled_from([DEEP, HUGE, EXPONENT]),
    st.integers(),
    st.text(max_size=8),
    st.lists(st.integers(-3, 10**6), max_size=4),
)


def _slots(node: Any, out: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Every (container, key) of a JSON document, depth first."""
    if isinstance(node, dict):
        for key in list(node):
            out.append((node, key))
            _slots(node[key], out)
    elif isinstance(node, list):
        for i in range(len(node)):
            out.append((node, i))
            _slots(node[i], out)
    return out


def mutate_json(data: st.DataObject, doc: Any) -> bytes:
    """A JSON-level edit of ``doc`` (changed in place): a value replaced by a hostile one,
    a key removed or renamed, an element duplicated or removed, an unknown key added."""
    slots = _slots(doc, [])
    for _ in range(data.draw(st.integers(1, 3), label="json edits")):
        if not slots:
            doc = data.draw(HOSTILE_VALUES, label="whole document")
            break
        container, key = data.draw(st.sampled_from(slots), label="slot")
        action = data.draw(st.sampled_from(["replace", "remove", "rename", "duplicate", "add"]))
        note(f"json edit: {action} at {key!r}")
        if key not in container if isinstance(container, dict) else key >= len(container):
            continue
        if action == "replace":
            container[key] = data.draw(HOSTILE_VALUES, label="value")
        elif action == "remove":
            del container[key]
        elif action == "rename" and isinstance(container, dict):
            container[data.draw(st.text(max_size=6), label="new key")] = container.pop(key)
        elif action == "duplicate" and isinstance(container, list):
            container.insert(key, container[key])
        elif action == "add" and isinstance(container, dict):
            container[data.draw(st.text(max_size=6), label="new key")] = data.draw(HOSTILE_VALUES)
        slots = _slots(doc, [])
    text = json.dumps(doc, allow_nan=True)
    text = text.replace(json.dumps(DEEP), "[" * 100_000 + "]" * 100_000)
    text = text.replace(json.dumps(HUGE), "1" + "0" * 5000)
    text = text.replace(json.dumps(EXPONENT), "1e999999")
    return text.encode("utf-8", "surrogatepass")


def mutate_bytes(data: st.DataObject, raw: bytes, other: bytes) -> bytes:
    """One to three byte-level mutations: bit flips, a byte set, truncation, insertion,
    deletion, a 64-bit length overwritten, a splice with ``other`` (another valid file)."""
    out = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        n = len(out)
        op = data.draw(
            st.sampled_from(["flip", "set", "truncate", "insert", "delete", "u64", "splice"]),
            label="op",
        )
        at = data.draw(st.integers(0, max(n - 1, 0)), label="at")
        if op == "flip" and n:
            out[at] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        elif op == "set" and n:
            out[at] = data.draw(st.integers(0, 255), label="byte")
        elif op == "truncate":
            del out[at:]
        elif op == "insert":
            out[at:at] = data.draw(st.binary(min_size=1, max_size=16), label="inserted")
        elif op == "delete":
            del out[at : at + data.draw(st.integers(1, 16), label="deleted")]
        elif op == "u64":
            value = data.draw(
                st.sampled_from([0, 1, 7, 2**31, 2**63 - 1, 2**64 - 1, max(n - 16, 0), n + 1]),
                label="u64",
            )
            out[at : at + 8] = value.to_bytes(8, "little")
        elif op == "splice":
            cut = data.draw(st.integers(0, len(other)), label="splice from")
            out[at:] = other[cut:]
        note(f"byte mutation: {op} at {at}")
    return bytes(out)


GIB = 1024**3
DEEP_TEXT = b"[" * 100_000 + b"]" * 100_000

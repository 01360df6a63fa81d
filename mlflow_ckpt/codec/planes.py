"""Byte planes: a block of elements regrouped by byte position (all first bytes, then all
second bytes, ...), and merged back.

Compressed checkpoints need both on every floating-point block: exponents compress when
they sit together, mantissas do not. The regrouping is a byte shuffle, which NumPy and
torch only do one byte per step (strided copies, 3.7-3.9 GB/s on one core here), so the
package builds a small optional C extension (``_planes.c``, SSE2 unpacks) that runs it at
memory speed. With NumPy, merging took ~0.16 s of CPU of a 604 MB compressed load, as
much as zstd itself; with the kernel, a load from the page cache went from 2.16x to 1.70x
an uncompressed one (docs/performance.md, Compression). Where it could not be built (no C
compiler at install time) the NumPy code below produces the same bytes, only slower;
:data:`NATIVE` says which one runs.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

try:
    import mlflow_ckpt.codec._planes as _native  # (the extension, not the package)
except ImportError:  # pragma: no cover - exercised by the tests through NATIVE = False
    _native = None

NATIVE = _native is not None
"""Whether the C kernel is in use (tests switch it off to check the NumPy path)."""


def workers() -> int:
    """Threads that byte-plane work (compressing, decoding, merging) spreads over: every
    core, at most 4. One number for the writer, the reader and the merge into a module."""
    return max(1, min(4, os.cpu_count() or 1))


def split(raw: np.ndarray, planes: int) -> list[np.ndarray]:
    """The planes of ``raw`` (a contiguous ``uint8`` array of whole elements), new arrays."""
    flat = raw.reshape(-1)
    if planes == 1:
        return [flat]
    count = flat.size // planes
    kernel = _kernel()
    if kernel is not None:
        out = [np.empty(count, np.uint8) for _ in range(planes)]
        kernel.split(flat, out)
        return out
    if planes in (2, 4):  # shifts on 16/32-bit lanes beat a strided byte transpose
        lanes = flat.view(np.uint16 if planes == 2 else np.uint32)
        return [(lanes >> (8 * i)).astype(np.uint8) for i in range(planes)]
    return list(flat.reshape(-1, planes).T.copy())


def merge(planes: list[np.ndarray], out: np.ndarray) -> None:
    """Undo :func:`split`: interleave ``planes`` (equal ``uint8`` arrays) into ``out``.

    The NumPy path is one ``numpy.stack`` along a new last axis, on the calling thread only
    (``torch.stack`` spreads over torch's OpenMP threads, which then spin against the zstd
    threads decoding beside it)."""
    kernel = _kernel()
    if kernel is not None:
        kernel.merge(out, planes)
        return
    np.stack(planes, axis=1, out=out.reshape(-1, len(planes)))


def _kernel() -> Any:
    return _native if NATIVE else None

"""Content hashing: SHA-256 computed while bytes are written, and re-computed on load.

Hashing during the write costs no extra pass over the data (the bytes are in cache anyway)
and lets the manifest record hashes of exactly what was written, not of a later re-read.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import BinaryIO

CHUNK_BYTES = 16 * 1024 * 1024
PARALLEL_MIN_BYTES = 1024 * 1024


class HashingWriter:
    """A write-only binary file wrapper that tracks the SHA-256 and size of what passes."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), CHUNK_BYTES):
            chunk = view[start : start + CHUNK_BYTES]
            if len(chunk) < PARALLEL_MIN_BYTES:
                self._hash.update(chunk)
                self._raw.write(chunk)
                continue
            # hashlib and file writes both release the GIL: hash while the bytes go out.
            hasher = threading.Thread(target=self._hash.update, args=(chunk,))
            hasher.start()
            try:
                self._raw.write(chunk)
            finally:
                hasher.join()
        self.size += len(view)
        return len(view)

    def flush(self) -> None:
        self._raw.flush()

    def writable(self) -> bool:
        return True

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


def sha256_file(path: Path) -> tuple[str, int]:
    """Return ``(hex digest, size)`` of a file, reading it in large chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size

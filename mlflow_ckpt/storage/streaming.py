"""Uploads straight from memory: a file written to a remote store never touches local disk.

A checkpoint's bytes already sit in host memory (the live tensors of a sync save, the
host buffers of an async one). Staging each shard in a local file before uploading it
cost a full write and re-read of the checkpoint on local disk, needed local disk space, and
left files behind when a process was killed. Instead, :class:`StreamingWriter` copies what
the codec writes into part buffers of ``TransferConfig.part_bytes`` and hands each full
part to the store's upload pool while the codec goes on encoding and hashing:

* a file that fits in one part is one request (S3 ``PutObject``, one Azure ``Put Blob``,
  one GCS resumable request, one ``PUT`` to an ``mlflow server``);
* a larger one goes up as S3 multipart parts or Azure blocks, several at a time, or as
  GCS resumable chunks or one chunked ``PUT`` to an ``mlflow server``, in order.

Each part is retried on its own (it is still in memory); nothing is visible at the file's
path until the last part is committed, and a failed or abandoned file is aborted. Memory is
bounded: at most ``max_workers + 1`` part buffers exist per store at any moment.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol

logger = logging.getLogger(__name__)


class PartSink(Protocol):
    """How one object of a remote store is written from memory.

    ``put`` writes a whole (small) object in one request. A larger one is ``begin``-ed,
    written with ``put_part`` (``final`` on the last part; ``offset`` is where the part
    starts in the object) and ``complete``-d with the tokens ``put_part`` returned, in
    part order, or ``abort``-ed. ``parallel`` says whether parts may be sent concurrently;
    ``retryable_parts`` whether one failed part may be sent again.
    """

    parallel: bool
    retryable_parts: bool

    def put(self, data: bytes | bytearray) -> None: ...

    def begin(self) -> None: ...

    def put_part(self, number: int, offset: int, data: bytes | bytearray, final: bool) -> Any: ...

    def complete(self, tokens: list[Any], total: int) -> None: ...

    def abort(self) -> None: ...


class PartUploads(Protocol):
    """What a store offers :class:`StreamingWriter`: a bounded pool and retries."""

    def acquire_part(self) -> None: ...

    def release_part(self) -> None: ...

    def submit(self, fn: Callable[[], Any]) -> Future[Any]: ...

    def attempt(self, fn: Callable[[], Any], action: str, retry: bool = True) -> Any: ...

    def progress(self, size: int) -> None: ...


class StreamingWriter:
    """A write-only binary file whose bytes go to a :class:`PartSink` in parts.

    ``close`` queues the last part (and the commit) on the store's pool and returns; the
    store's ``flush`` waits for them. ``abort`` drops the file.
    """

    def __init__(
        self,
        uploads: PartUploads,
        sink: PartSink,
        rel_path: str,
        part_bytes: int,
        single_put_bytes: int | None = None,
    ) -> None:
        self._uploads = uploads
        self._sink = sink
        self._rel_path = rel_path
        self._part_bytes = part_bytes
        self._first_bytes = max(part_bytes, single_put_bytes or part_bytes)
        # The first part is gathered as copies of what is written (no buffer of its full
        # size is allocated for a small file); later parts fill preallocated buffers.
        self._gathered: list[bytes] | None = None
        self._buffer: bytearray | None = None
        self._filled = 0
        self._offset = 0  # where the current buffer starts in the file
        self._parts: list[Future[Any]] = []
        self._begun = False
        self.size: int = 0

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        """Nothing to do: parts leave when they are full."""

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        position = 0
        while position < len(view):
            if self._buffer is None and self._gathered is None:
                self._uploads.acquire_part()
                self._filled = 0
                if self._parts:
                    self._buffer = bytearray(self._part_bytes)
                else:
                    self._gathered = []
            capacity = self._part_bytes if self._gathered is None else self._first_bytes
            if self._filled == capacity:
                self._send(final=False)  # more bytes follow: this part is not the last
                continue
            n = min(len(view) - position, capacity - self._filled)
            if self._gathered is not None:
                self._gathered.append(bytes(view[position : position + n]))
            else:
                assert self._buffer is not None
                self._buffer[self._filled : self._filled + n] = view[position : position + n]
            self._filled += n
            position += n
        self.size += len(view)
        return len(view)

    def _send(self, final: bool) -> None:
        """Queue the current buffer as the next part (never the only one)."""
        for future in self._parts:  # fail fast: an earlier part already failed for good
            if future.done() and future.exception() is not None:
                raise future.exception()  # type: ignore[misc]
        if not self._begun:
            self._uploads.attempt(self._sink.begin, f"start the upload of {self._rel_path} to")
            self._begun = True
        data = self._take_buffer()
        number, offset, previous = len(self._parts) + 1, self._offset, self._last_part()
        sink, uploads, rel_path = self._sink, self._uploads, self._rel_path

        def upload() -> Any:
            try:
                if previous is not None and not sink.parallel:
                    previous.result()  # in order; started earlier, the pool is FIFO
                token = uploads.attempt(
                    lambda: sink.put_part(number, offset, data, final),
                    f"upload part {number} of {rel_path} to",
                    retry=sink.retryable_parts,
                )
                uploads.progress(len(data))
                return token
            finally:
                uploads.release_part()

        self._parts.append(uploads.submit(upload))
        self._offset += len(data)

    def _holds(self) -> bool:
        return self._buffer is not None or self._gathered is not None

    def _take_buffer(self) -> bytes | bytearray:
        """The filled part (a later one without a copy: a bytearray is a valid body for
        every SDK we call); the next write starts a fresh one."""
        if self._gathered is not None:
            data: bytes | bytearray = b"".join(self._gathered)
            self._gathered = None
        else:
            assert self._buffer is not None
            data, self._buffer = self._buffer, None
            del data[self._filled :]  # the last part: shrink in place
        self._filled = 0
        return data

    def _last_part(self) -> Future[Any] | None:
        return self._parts[-1] if self._parts else None

    def close(self) -> Future[Any]:
        """Queue the rest of the file and its commit; return the future that ends it."""
        if not self._parts:  # one part (or an empty file): a single request
            holds = self._holds()
            data = self._take_buffer() if holds else b""
            sink, uploads, rel_path = self._sink, self._uploads, self._rel_path

            def put() -> None:
                try:
                    uploads.attempt(lambda: sink.put(data), f"upload {rel_path} to")
                    uploads.progress(len(data))
                finally:
                    if holds:
                        uploads.release_part()

            return self._uploads.submit(put)
        if self._holds() and self._filled:
            self._send(final=True)
        elif self._holds():  # pragma: no cover - a full part is always sent lazily
            self._uploads.release_part()
            self._buffer = self._gathered = None
        parts, sink, total = list(self._parts), self._sink, self._offset

        def commit() -> None:
            try:
                tokens = [p.result() for p in parts]  # started earlier: the pool is FIFO
            except BaseException:
                _abort_quietly(sink, self._rel_path)
                raise
            self._uploads.attempt(
                lambda: sink.complete(tokens, total), f"commit {self._rel_path} to"
            )

        return self._uploads.submit(commit)

    def abort(self) -> None:
        """Drop the file: wait for parts in flight, then abort the upload (best effort)."""
        if self._holds():
            self._uploads.release_part()
            self._buffer = self._gathered = None
        for future in self._parts:  # their errors don't matter: the write failed already
            with contextlib.suppress(Exception):
                future.result()
        if self._begun:
            _abort_quietly(self._sink, self._rel_path)


def _abort_quietly(sink: PartSink, rel_path: str) -> None:
    try:
        sink.abort()
    except Exception as exc:
        logger.warning(
            "Could not abort the partial upload of %s (%s); the store drops "
            "unfinished uploads by itself after a while.",
            rel_path,
            exc,
        )


__all__ = ["PartSink", "PartUploads", "StreamingWriter"]

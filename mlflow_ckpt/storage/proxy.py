"""Uploads to an ``mlflow server`` that proxies artifacts, straight from memory.

The server takes one ``PUT`` per file (its multipart API only hands out presigned URLs of
the store behind it, which clients of a proxy usually cannot reach). A file up to
``TransferConfig.part_bytes`` is sent as one request body, retried like any other request.
A larger one is streamed as one chunked request while it is being encoded: parts pass
through a one-slot queue, so memory stays bounded, but a request cut halfway cannot be
resumed; it fails the save with a clear error (the next save starts afresh).
"""

from __future__ import annotations

import logging
import mimetypes
import posixpath
import queue
import threading
from collections.abc import Iterator
from typing import Any

from mlflow_ckpt.storage.repository import RepositoryStore
from mlflow_ckpt.storage.streaming import PartSink

logger = logging.getLogger(__name__)
_END = object()
_ABORT = object()


class ProxyStore(RepositoryStore):
    """``mlflow-artifacts:/...`` or ``http(s)://.../mlflow-artifacts/artifacts/...``."""

    def _sink(self, directory: str, name: str) -> PartSink | None:
        from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository

        if not isinstance(self._repo, HttpArtifactRepository):
            return None
        endpoint = posixpath.join("/", *(p for p in (directory, name) if p))
        return _ProxyFile(self._repo, endpoint, mimetypes.guess_type(name)[0])


class _ProxyFile:
    """One artifact ``PUT`` to the server (see :class:`~.streaming.PartSink`)."""

    parallel = False
    retryable_parts = False  # parts of one request body: a cut request cannot resume

    def __init__(self, repo: Any, endpoint: str, content_type: str | None) -> None:
        self._repo = repo
        self._endpoint = endpoint
        self._headers = {"Content-Type": content_type or "application/octet-stream"}
        self._parts: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _request(self, body: Any) -> None:
        from mlflow.utils.rest_utils import augmented_raise_for_status, http_request

        response = http_request(
            self._repo._host_creds,
            self._endpoint,
            "PUT",
            data=body,
            extra_headers=self._headers,
            max_retries=0,  # ours retry (a body from a generator cannot be replayed anyway)
        )
        augmented_raise_for_status(response)

    def put(self, data: bytes | bytearray) -> None:
        self._request(data)

    def begin(self) -> None:
        def body() -> Iterator[bytes]:
            while (part := self._parts.get()) is not _END:
                if part is _ABORT:  # cut the body short: the server never stores it
                    raise ConnectionAbortedError(f"upload of {self._endpoint} aborted")
                yield part

        def run() -> None:
            try:
                self._request(body())
            except BaseException as exc:
                self._error = exc

        self._thread = threading.Thread(target=run, name="mlflow-ckpt-proxy-put", daemon=True)
        self._thread.start()

    def _hand_over(self, item: object) -> None:
        assert self._thread is not None
        while True:
            if self._error is not None:
                raise self._error
            try:
                self._parts.put(item, timeout=0.2)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    raise self._error or RuntimeError("the upload request ended early") from None

    def put_part(self, number: int, offset: int, data: bytes | bytearray, final: bool) -> None:
        self._hand_over(data)

    def complete(self, tokens: list[Any], total: int) -> None:
        self._hand_over(_END)
        assert self._thread is not None
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Cut the request: the server gets a truncated chunked body and stores nothing."""
        if self._thread is not None and self._thread.is_alive():
            try:
                self._parts.put(_ABORT, timeout=5)
            except queue.Full:
                logger.warning("Could not cut the upload of %s short", self._endpoint)
            self._thread.join(timeout=30)

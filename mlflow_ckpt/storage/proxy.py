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
from pathlib import Path
from typing import Any

from mlflow_ckpt.storage.repository import RepositoryStore
from mlflow_ckpt.storage.streaming import PartSink

logger = logging.getLogger(__name__)
_END = object()
_ABORT = object()


def _call(host_creds: Any, endpoint: str, method: str, **kwargs: Any) -> Any:
    """One HTTP request to the server, tried once, its error status raised as such.

    MLflow's ``http_request`` retries 7 times by default; ``max_retries=0`` makes ours the
    one retry layer, and ``raise_on_status=False`` hands back a 503 as a reply (so its
    status classifies it) rather than as urllib3's "too many retries" error.
    """
    from mlflow.utils.request_utils import augmented_raise_for_status
    from mlflow.utils.rest_utils import http_request

    response = http_request(
        host_creds, endpoint, method, max_retries=0, raise_on_status=False, **kwargs
    )
    augmented_raise_for_status(response)
    return response


def _creds(artifact_uri: str) -> Any:
    """Host and auth for ``artifact_uri`` (``MLFLOW_TRACKING_TOKEN``/``USERNAME``/
    ``PASSWORD``, ``MLFLOW_TRACKING_INSECURE_TLS``, auth plugins...), through MLflow's public
    ``mlflow.utils.credentials.get_default_host_creds``: what its repository's private
    ``_host_creds`` property returns."""
    from mlflow.utils.credentials import get_default_host_creds

    return get_default_host_creds(artifact_uri)


class ProxyStore(RepositoryStore):
    """``mlflow-artifacts:/...`` or ``http(s)://.../mlflow-artifacts/artifacts/...``."""

    _ENDPOINT = "/mlflow-artifacts/artifacts"

    def _http(self) -> str | None:
        """The resolved ``http(s)://`` artifact URI, or ``None`` for another repository."""
        from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository

        return self._repo.artifact_uri if isinstance(self._repo, HttpArtifactRepository) else None

    def _sink(self, directory: str, name: str) -> PartSink | None:
        base = self._http()
        if base is None:
            return None
        endpoint = posixpath.join("/", *(p for p in (directory, name) if p))
        return _ProxyFile(_creds(base), endpoint, mimetypes.guess_type(name)[0])

    def _listing(self, directory: str) -> tuple[dict[str, int], list[str]]:
        base = self._http()
        if base is None or self._ENDPOINT not in base:
            return super()._listing(directory)
        # The listing endpoint hangs off the server's root, the path goes as a parameter
        # (as MLflow's repository lists).
        server, tail = base.split(self._ENDPOINT, maxsplit=1)
        root = tail.strip("/")
        path = posixpath.join(root, directory) if directory else root
        reply = _call(_creds(server), self._ENDPOINT, "GET", params={"path": path}).json()
        files: dict[str, int] = {}
        folders: list[str] = []
        for item in reply.get("files", []):
            name = posixpath.basename(item["path"].rstrip("/"))
            if item.get("is_dir"):
                folders.append(name)
            else:
                files[name] = int(item.get("file_size") or 0)
        return files, folders

    def _download(self, rel_path: str, target: Path) -> Path:
        base = self._http()
        if base is None:
            return super()._download(rel_path, target)
        local = target / posixpath.basename(rel_path)
        reply = _call(_creds(base), posixpath.join("/", rel_path), "GET", stream=True)
        with reply, open(local, "wb") as f:
            for chunk in reply.iter_content(chunk_size=1 << 20):
                f.write(chunk)
        return local

    def _remove(self, rel_path: str) -> None:
        base = self._http()
        if base is None:
            super()._remove(rel_path)
        else:
            _call(_creds(base), posixpath.join("/", rel_path), "DELETE").close()

    def _remove_all(self) -> None:
        base = self._http()
        if base is None:
            super()._remove_all()
        else:
            _call(_creds(base), "/", "DELETE").close()


class _ProxyFile:
    """One artifact ``PUT`` to the server (see :class:`~.streaming.PartSink`)."""

    parallel = False
    retryable_parts = False  # parts of one request body: a cut request cannot resume

    def __init__(self, host_creds: Any, endpoint: str, content_type: str | None) -> None:
        self._host_creds = host_creds
        self._endpoint = endpoint
        self._headers = {"Content-Type": content_type or "application/octet-stream"}
        self._parts: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _request(self, body: Any) -> None:
        # tried once: ours retry (a body from a generator cannot be replayed anyway)
        _call(self._host_creds, self._endpoint, "PUT", data=body, extra_headers=self._headers)

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

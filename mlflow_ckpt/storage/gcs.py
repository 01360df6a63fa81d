"""Google Cloud Storage uploads from memory as resumable uploads, and listings, downloads,
deletes, all without touching ``random`` and with the SDK's retries off.

Every file goes up through a resumable upload session: a small file in one ``PUT``, a
larger one in chunks sent in order (GCS resumable chunks cannot be parallel), each a
multiple of 256 KiB except the last. Nothing is visible at the object's name until the
last chunk arrives. google-cloud-storage's other path, the multipart request for small
files, draws its boundary from the global ``random`` module: on our background thread that
would shift the training loop's random numbers, so it is never used; the SDK's own retries
(which jitter with the global stream too) are off on every call (``retry=None``): ours use a
private generator.

The session is opened with the public ``Blob.create_resumable_upload_session``; the chunks
are plain HTTP ``PUT``s to the session URI, as GCS documents them: the URI itself
authorises the upload ("allows untrusted clients to upload"), so no credentials, and no
private transport of the client, are needed to send them.
"""

from __future__ import annotations

import mimetypes
import posixpath
from pathlib import Path
from typing import Any

from mlflow_ckpt.storage import clients
from mlflow_ckpt.storage.repository import RepositoryStore
from mlflow_ckpt.storage.streaming import PartSink
from mlflow_ckpt.storage.transfer import TransferConfig

_DONE = (200, 201)
_INCOMPLETE = 308  # "Resume Incomplete": the chunk was stored, send the next one
_TIMEOUT_S = 300


class GCSStore(RepositoryStore):
    """``gs://bucket/path`` through google-cloud-storage, with resumable uploads only."""

    cold_class: str | None = "COLDLINE"  # read at once, like every GCS class
    hot_class: str | None = "STANDARD"

    def __init__(self, uri: str, config: TransferConfig | None = None) -> None:
        super().__init__(uri, config)
        self._bucket_name, _, prefix = uri.removeprefix("gs://").partition("/")
        self._prefix = prefix.strip("/")
        self._client = clients.Lazy(clients.gcs_client)

    @property
    def client(self) -> Any:
        """The storage client (made on first use)."""
        return self._client.get()

    def _blob(self, rel_path: str) -> Any:
        return self.client.bucket(self._bucket_name).blob(self._key(rel_path))

    def _listing(self, directory: str) -> tuple[dict[str, int], list[str]]:
        folder = self._key(directory).rstrip("/")
        start = f"{folder}/" if folder else ""
        pages = self.client.list_blobs(
            self._bucket_name, prefix=start, delimiter="/", retry=None, timeout=_TIMEOUT_S
        )
        files = {b.name[len(start) :]: int(b.size or 0) for b in pages if b.name != start}
        folders = [p[len(start) :].rstrip("/") for p in pages.prefixes]  # after iterating
        return files, folders

    def _download(self, rel_path: str, target: Path) -> Path:
        local = target / posixpath.basename(rel_path)
        self._blob(rel_path).download_to_filename(
            str(local), retry=None, timeout=_TIMEOUT_S, checksum="auto"
        )
        return local

    def _remove(self, rel_path: str) -> None:
        self._blob(rel_path).delete(retry=None, timeout=_TIMEOUT_S)

    def _remove_all(self) -> None:
        folder = self._key("").rstrip("/")
        pages = self.client.list_blobs(
            self._bucket_name, prefix=f"{folder}/" if folder else "", retry=None
        )
        for blob in list(pages):
            blob.delete(retry=None, timeout=_TIMEOUT_S)

    def set_storage_class(self, rel_path: str, storage_class: str) -> None:
        blob = self._blob(rel_path)
        # A rewrite of the object onto itself (GCS changes a class no other way); the
        # client repeats it with the rewrite token until large objects are done.
        self._run(
            lambda: blob.update_storage_class(storage_class, retry=None),
            f"move {rel_path} to {storage_class} in",
        )

    def storage_class(self, rel_path: str) -> str:
        blob = self._blob(rel_path)
        self._run(lambda: blob.reload(retry=None), "read")
        return str(blob.storage_class)

    def _sink(self, directory: str, name: str) -> PartSink | None:
        return _GCSObject(self._blob(posixpath.join(directory, name)))


class _GCSObject:
    """One GCS object written through a resumable session (see :class:`.PartSink`)."""

    parallel = False
    retryable_parts = True

    def __init__(self, blob: Any) -> None:
        self._blob = blob
        self._session: str | None = None
        self._http: Any = None

    def begin(self) -> None:
        import requests

        content_type = mimetypes.guess_type(self._blob.name)[0] or "application/octet-stream"
        self._session = self._blob.create_resumable_upload_session(
            content_type=content_type, checksum=None, retry=None
        )
        # A plain session: requests retries nothing by default (ours retry each chunk).
        self._http = requests.Session()

    def put(self, data: bytes | bytearray) -> None:
        self.begin()
        try:
            self.put_part(1, 0, data, final=True)
        finally:
            self._http.close()

    def put_part(self, number: int, offset: int, data: bytes | bytearray, final: bool) -> None:
        end = offset + len(data)
        total = str(end) if final else "*"
        span = f"bytes {offset}-{end - 1}/{total}" if data else f"bytes */{total}"
        response = self._http.put(
            self._session, data=data, headers={"Content-Range": span}, timeout=_TIMEOUT_S
        )
        expected = _DONE if final else (_INCOMPLETE,)
        if response.status_code not in expected:
            response.raise_for_status()  # an error status: retried or reported as is
            raise RuntimeError(
                f"GCS answered {response.status_code} to chunk {number} ({span}) of "
                f"{self._blob.name}, expected {'/'.join(map(str, expected))}"
            )

    def complete(self, tokens: list[Any], total: int) -> None:
        """Nothing left: the final chunk finished the upload."""
        self._http.close()

    def abort(self) -> None:
        if self._session is not None:  # cancel the session; unfinished ones expire anyway
            self._http.delete(self._session, timeout=60)
            self._http.close()

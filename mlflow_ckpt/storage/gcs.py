"""Google Cloud Storage uploads from memory, as resumable uploads, without touching ``random``.

Every file goes up through a resumable upload session: a small file in one ``PUT``, a
larger one in chunks sent in order (GCS resumable chunks cannot be parallel), each a
multiple of 256 KiB except the last. Nothing is visible at the object's name until the
last chunk arrives. google-cloud-storage's other path, the multipart request for small
files, draws its boundary from the global ``random`` module: on our background thread that
would shift the training loop's random numbers, so it is never used; the SDK's own retries
(which jitter with the global stream too) are off: ours use a private generator.
"""

from __future__ import annotations

import mimetypes
import posixpath
from typing import Any

from mlflow_ckpt.storage.repository import RepositoryStore
from mlflow_ckpt.storage.streaming import PartSink

_DONE = (200, 201)
_INCOMPLETE = 308  # "Resume Incomplete": the chunk was stored, send the next one


class GCSStore(RepositoryStore):
    """``gs://bucket/path`` through google-cloud-storage, with resumable uploads only."""

    cold_class = "COLDLINE"  # read at once, like every GCS class
    hot_class = "STANDARD"

    def _blob(self, rel_path: str) -> Any:
        from google.cloud import storage

        bucket, _, prefix = self.uri.removeprefix("gs://").partition("/")
        return storage.Client().bucket(bucket).blob(posixpath.join(prefix, rel_path))

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
        bucket, _, prefix = self.uri.removeprefix("gs://").partition("/")
        return _GCSObject(bucket, posixpath.join(prefix, directory, name))


class _GCSObject:
    """One GCS object written through a resumable session (see :class:`.PartSink`)."""

    parallel = False
    retryable_parts = True

    def __init__(self, bucket: str, name: str) -> None:
        self._bucket = bucket
        self._name = name
        self._client: Any = None
        self._session: str | None = None

    def begin(self) -> None:
        from google.cloud import storage

        self._client = storage.Client()
        blob = self._client.bucket(self._bucket).blob(self._name)
        content_type = mimetypes.guess_type(self._name)[0] or "application/octet-stream"
        self._session = blob.create_resumable_upload_session(
            content_type=content_type, client=self._client, checksum=None, retry=None
        )

    def put(self, data: bytes | bytearray) -> None:
        self.begin()
        self.put_part(1, 0, data, final=True)

    def put_part(self, number: int, offset: int, data: bytes | bytearray, final: bool) -> None:
        end = offset + len(data)
        total = str(end) if final else "*"
        span = f"bytes {offset}-{end - 1}/{total}" if data else f"bytes */{total}"
        response = self._client._http.put(
            self._session, data=data, headers={"Content-Range": span}, timeout=300
        )
        expected = _DONE if final else (_INCOMPLETE,)
        if response.status_code not in expected:
            response.raise_for_status()  # an error status: retried or reported as is
            raise RuntimeError(
                f"GCS answered {response.status_code} to chunk {number} ({span}) of "
                f"{self._name}, expected {'/'.join(map(str, expected))}"
            )

    def complete(self, tokens: list[Any], total: int) -> None:
        """Nothing left: the final chunk finished the upload."""

    def abort(self) -> None:
        if self._session is not None:  # cancel the session; unfinished ones expire anyway
            self._client._http.delete(self._session, timeout=60)

"""Google Cloud Storage uploads that leave Python's global random stream alone.

google-cloud-storage uploads files under 8 MiB with a multipart request whose boundary it
draws from the global ``random`` module. On our background thread that shifts the training
loop's random numbers, so a run would no longer be reproducible. Streaming the file as a
resumable upload of unknown size takes the other code path, which draws nothing; SDK-level
retries (which jitter with the global stream too) are off: ours use a private generator.
"""

from __future__ import annotations

import posixpath
from pathlib import Path

from mlflow_ckpt.storage.repository import RepositoryStore

CHUNK_BYTES = 16 * 1024 * 1024  # a multiple of 256 KiB, as GCS requires


class GCSStore(RepositoryStore):
    """``gs://bucket/path`` through google-cloud-storage, with resumable uploads only."""

    def _put(self, local: Path, directory: str) -> None:
        from google.cloud import storage

        bucket_name, _, prefix = self.uri.removeprefix("gs://").partition("/")
        name = (
            posixpath.join(prefix, directory, local.name)
            if directory
            else posixpath.join(prefix, local.name)
        )
        client = storage.Client()
        blob = client.bucket(bucket_name).blob(name, chunk_size=CHUNK_BYTES)
        with open(local, "rb") as f:
            blob.upload_from_file(f, retry=None)  # size unknown: the resumable path

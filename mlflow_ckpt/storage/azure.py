"""Azure Blob uploads from memory: one ``Put Blob`` per small file, staged blocks for larger.

A file up to ``TransferConfig.part_bytes`` is one request; a larger one is staged as blocks,
several at a time while the next is encoded, and appears only when its block list is
committed (uncommitted blocks are dropped by the service after a week). The blob client,
credentials and timeouts are those of MLflow's Azure repository.
"""

from __future__ import annotations

import base64
import logging
import mimetypes
import posixpath
from typing import Any

from mlflow_ckpt.storage.repository import RepositoryStore
from mlflow_ckpt.storage.streaming import PartSink

logger = logging.getLogger(__name__)


class AzureStore(RepositoryStore):
    """``wasbs://container@account.blob.core.windows.net/path``."""

    cold_class = "Cool"  # online tiers: read at once ("Archive" would need a rehydration)
    hot_class = "Hot"

    def _blob(self, rel_path: str) -> Any:
        repo = self._repo
        container, _, prefix, _ = repo.parse_wasbs_uri(repo.artifact_uri)
        return repo.client.get_blob_client(container, posixpath.join(prefix, rel_path))

    def set_storage_class(self, rel_path: str, storage_class: str) -> None:
        blob = self._blob(rel_path)
        self._run(
            lambda: blob.set_standard_blob_tier(storage_class),
            f"move {rel_path} to {storage_class} in",
        )

    def storage_class(self, rel_path: str) -> str:
        blob = self._blob(rel_path)
        return str(self._run(blob.get_blob_properties, "read").blob_tier)

    def _sink(self, directory: str, name: str) -> PartSink | None:
        repo = self._repo
        try:
            container, _, prefix, _ = repo.parse_wasbs_uri(repo.artifact_uri)
            blob = repo.client.get_blob_client(container, posixpath.join(prefix, directory, name))
            timeout = repo.write_timeout
        except AttributeError:  # another MLflow layout: stage the file and use its public API
            logger.debug("MLflow's Azure repository changed shape; staging uploads locally")
            return None
        return _AzureBlob(blob, timeout, mimetypes.guess_type(name)[0])


class _AzureBlob:
    """One block blob written from memory (see :class:`~.streaming.PartSink`)."""

    parallel = True
    retryable_parts = True

    def __init__(self, blob: Any, timeout: int, content_type: str | None) -> None:
        self._blob = blob
        self._timeout = timeout
        self._settings: Any = None
        if content_type:
            from azure.storage.blob import ContentSettings

            self._settings = ContentSettings(content_type=content_type)

    def put(self, data: bytes | bytearray) -> None:
        self._blob.upload_blob(
            bytes(data),  # the SDK takes a bytearray for an iterable of ints
            overwrite=True,
            timeout=self._timeout,
            content_settings=self._settings,
        )

    def begin(self) -> None:
        """Blocks need no session."""

    def put_part(self, number: int, offset: int, data: bytes | bytearray, final: bool) -> str:
        block_id = base64.b64encode(f"{number:010d}".encode()).decode()
        self._blob.stage_block(block_id, bytes(data), length=len(data), timeout=self._timeout)
        return block_id

    def complete(self, tokens: list[Any], total: int) -> None:
        from azure.storage.blob import BlobBlock

        self._blob.commit_block_list(
            [BlobBlock(block_id=t) for t in tokens],
            content_settings=self._settings,
            timeout=self._timeout,
        )

    def abort(self) -> None:
        """Nothing to do: uncommitted blocks never become visible and expire."""

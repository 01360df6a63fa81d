"""Azure Blob through our own client: uploads from memory, listings, downloads, deletes.

A file up to ``TransferConfig.part_bytes`` is one ``Put Blob``; a larger one is staged as
blocks, several at a time while the next is encoded, and appears only when its block list
is committed (uncommitted blocks are dropped by the service after a week). The client has
MLflow's credentials and timeouts (see :mod:`mlflow_ckpt.storage.clients`) but
``retry_total=0``: MLflow's own retries each call 10 times under ours.
"""

from __future__ import annotations

import base64
import logging
import mimetypes
import posixpath
from pathlib import Path
from typing import Any

from mlflow.environment_variables import MLFLOW_ARTIFACT_UPLOAD_DOWNLOAD_TIMEOUT

# (for its wasbs:// URI parser, so the URI means what it means to MLflow; 3.0.0-3.17.2)
from mlflow.store.artifact.azure_blob_artifact_repo import AzureBlobArtifactRepository

from mlflow_ckpt.storage import clients
from mlflow_ckpt.storage.repository import RepositoryStore
from mlflow_ckpt.storage.streaming import PartSink
from mlflow_ckpt.storage.transfer import TransferConfig

logger = logging.getLogger(__name__)

_DEFAULT_TIMEOUT_S = 600  # MLflow's per-request timeout for Azure when none is set


class AzureStore(RepositoryStore):
    """``wasbs://container@account.blob.core.windows.net/path``."""

    # online tiers: read at once ("Archive" would need a rehydration)
    cold_class: str | None = "Cool"
    hot_class: str | None = "Hot"

    def __init__(self, uri: str, config: TransferConfig | None = None) -> None:
        super().__init__(uri, config)
        parsed = AzureBlobArtifactRepository.parse_wasbs_uri(uri)
        self._container_name, self._account, prefix, self._suffix = parsed
        self._prefix = prefix.strip("/")
        self._timeout = MLFLOW_ARTIFACT_UPLOAD_DOWNLOAD_TIMEOUT.get() or _DEFAULT_TIMEOUT_S
        self._container = clients.Lazy(self._make_container)

    def _make_container(self) -> Any:
        service = clients.azure_service_client(self.uri, self._account, self._suffix)
        return service.get_container_client(self._container_name)

    @property
    def container(self) -> Any:
        """The container's client (made on first use)."""
        return self._container.get()

    def _blob(self, rel_path: str) -> Any:
        return self.container.get_blob_client(self._key(rel_path))

    def _listing(self, directory: str) -> tuple[dict[str, int], list[str]]:
        from azure.storage.blob import BlobPrefix

        folder = self._key(directory).rstrip("/")
        start = f"{folder}/" if folder else ""
        files: dict[str, int] = {}
        folders: list[str] = []
        for item in self.container.walk_blobs(
            name_starts_with=start, delimiter="/", timeout=self._timeout
        ):
            name = item.name[len(start) :]
            if isinstance(item, BlobPrefix):
                folders.append(name.rstrip("/"))
            elif name:
                files[name] = int(item.size)
        return files, folders

    def _download(self, rel_path: str, target: Path) -> Path:
        local = target / posixpath.basename(rel_path)
        stream = self._blob(rel_path).download_blob(
            max_concurrency=self.config.max_workers, timeout=self._timeout
        )
        with open(local, "wb") as f:
            stream.readinto(f)
        return local

    def _remove(self, rel_path: str) -> None:
        self._blob(rel_path).delete_blob(timeout=self._timeout)

    def _remove_all(self) -> None:
        folder = self._key("").rstrip("/")
        start = f"{folder}/" if folder else ""
        names = [b.name for b in self.container.list_blobs(name_starts_with=start)]
        for name in names:
            self.container.delete_blob(name, timeout=self._timeout)

    def set_storage_class(self, rel_path: str, storage_class: str) -> None:
        blob = self._blob(rel_path)
        self._run(
            lambda: blob.set_standard_blob_tier(storage_class, timeout=self._timeout),
            f"move {rel_path} to {storage_class} in",
        )

    def storage_class(self, rel_path: str) -> str:
        blob = self._blob(rel_path)
        props = self._run(lambda: blob.get_blob_properties(timeout=self._timeout), "read")
        return str(props.blob_tier)

    def _sink(self, directory: str, name: str) -> PartSink | None:
        blob = self._blob(posixpath.join(directory, name))
        return _AzureBlob(blob, self._timeout, mimetypes.guess_type(name)[0])


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

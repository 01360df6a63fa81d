"""Storage layer: artifact-store I/O behind one small interface (see :class:`Store`)."""

from __future__ import annotations

from mlflow_ckpt.storage.base import Store, StoreError
from mlflow_ckpt.storage.local import TEMP_MARKER, LocalStore, local_path_of
from mlflow_ckpt.storage.retry import RetryPolicy, is_transient
from mlflow_ckpt.storage.transfer import TransferConfig, redact


def open_store(uri: str, config: TransferConfig | None = None) -> Store:
    """Return the :class:`Store` for an artifact location URI (local path or remote URI)."""
    path = local_path_of(uri)
    if path is not None:
        return LocalStore(uri, path)
    if uri.startswith("s3://"):
        from mlflow_ckpt.storage.s3 import S3Store

        return S3Store(uri, config)
    if uri.startswith("gs://"):
        from mlflow_ckpt.storage.gcs import GCSStore

        return GCSStore(uri, config)
    if uri.startswith(("wasbs://", "wasb://")):
        from mlflow_ckpt.storage.azure import AzureStore

        return AzureStore(uri, config)
    if uri.startswith(("mlflow-artifacts:", "http://", "https://")):
        from mlflow_ckpt.storage.proxy import ProxyStore

        return ProxyStore(uri, config)
    from mlflow_ckpt.storage.repository import RepositoryStore

    return RepositoryStore(uri, config)


__all__ = [
    "TEMP_MARKER",
    "LocalStore",
    "RetryPolicy",
    "Store",
    "StoreError",
    "TransferConfig",
    "is_transient",
    "local_path_of",
    "open_store",
    "redact",
]

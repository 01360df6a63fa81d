"""Storage layer: artifact-store I/O behind one small interface (see :class:`Store`)."""

from __future__ import annotations

from mlflow_ckpt.storage.base import Store
from mlflow_ckpt.storage.local import TEMP_MARKER, LocalStore, local_path_of


def open_store(uri: str) -> Store:
    """Return the :class:`Store` for an artifact location URI (local path or remote URI)."""
    path = local_path_of(uri)
    if path is not None:
        return LocalStore(uri, path)
    from mlflow_ckpt.storage.repository import RepositoryStore

    return RepositoryStore(uri)


__all__ = ["TEMP_MARKER", "LocalStore", "Store", "local_path_of", "open_store"]

"""A checkpoint folder together with its run's shared area, seen as one store.

An incremental checkpoint lists some files as ``@shared/<group>/<name>``: bytes written
once by an earlier checkpoint of the same run and referenced since. Handing the readers (and
the writer) this view lets every layer above address those files like any other listed file,
while they live in the run's shared area (see :mod:`mlflow_ckpt.catalog.shared`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from mlflow_ckpt.storage.base import Store

PREFIX = "@shared/"


class RoutedStore(Store):
    """``own`` (the checkpoint's folder), with ``@shared/...`` paths going to ``shared``."""

    def __init__(self, own: Store, shared: Store) -> None:
        super().__init__(own.uri)
        self.own = own
        self.shared = shared
        # Local roots a fetched file may lie under (see codec.layout.fetch_inside).
        self.roots = [r for r in (getattr(own, "root", None), getattr(shared, "root", None)) if r]

    def route(self, rel_path: str) -> tuple[Store, str]:
        """The store and path that ``rel_path`` lives at."""
        if rel_path.startswith(PREFIX) or rel_path == PREFIX.rstrip("/"):
            return self.shared, rel_path[len(PREFIX) :]
        return self.own, rel_path

    @contextlib.contextmanager
    def open_writer(self, rel_path: str) -> Iterator[BinaryIO]:
        store, path = self.route(rel_path)
        with store.open_writer(path) as f:
            yield f

    def fetch(self, rel_path: str, scratch_dir: Path) -> Path:
        store, path = self.route(rel_path)
        return store.fetch(path, scratch_dir)

    def exists(self, rel_path: str) -> bool:
        store, path = self.route(rel_path)
        return store.exists(path)

    def list_sizes(self, directory: str) -> dict[str, int]:
        store, path = self.route(directory)
        return store.list_sizes(path)

    def delete_all(self) -> None:
        """Delete the checkpoint's own folder; the shared area outlives any one checkpoint."""
        self.own.delete_all()

    @property
    def parallelism(self) -> int:
        return self.own.parallelism

    @property
    def parallel_writes(self) -> int:
        return self.own.parallel_writes

    def flush(self) -> None:
        try:
            self.shared.flush()
        finally:
            self.own.flush()

    def close(self) -> None:
        try:
            self.shared.close()
        finally:
            self.own.close()

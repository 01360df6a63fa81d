"""A sub-folder of a store, seen as a store of its own.

A distributed checkpoint keeps each rank's own files under ``ranks/<rank>/``: the same
encoder that lays out a whole single-process checkpoint lays out one rank's part when it is
handed this view.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from mlflow_ckpt.storage.base import Store


class PrefixStore(Store):
    """The files of ``inner`` under ``prefix/``; closing it leaves ``inner`` open."""

    def __init__(self, inner: Store, prefix: str) -> None:
        super().__init__(f"{inner.uri.rstrip('/')}/{prefix}")
        self.inner = inner
        self.prefix = prefix.strip("/")
        # Local roots (a routed store has two) let readers check files lie inside the folder.
        roots = getattr(inner, "roots", None) or [getattr(inner, "root", None)]
        self.roots = [r / self.prefix for r in roots if isinstance(r, Path)]
        if self.roots:
            self.root = self.roots[0]

    def _path(self, rel_path: str) -> str:
        return f"{self.prefix}/{rel_path}" if rel_path else self.prefix

    @contextlib.contextmanager
    def open_writer(self, rel_path: str) -> Iterator[BinaryIO]:
        with self.inner.open_writer(self._path(rel_path)) as f:
            yield f

    def fetch(self, rel_path: str, scratch_dir: Path) -> Path:
        return self.inner.fetch(self._path(rel_path), scratch_dir)

    def exists(self, rel_path: str) -> bool:
        return self.inner.exists(self._path(rel_path))

    def list_sizes(self, directory: str) -> dict[str, int]:
        return self.inner.list_sizes(self._path(directory))

    def delete_all(self) -> None:
        raise NotImplementedError("a sub-folder is deleted with the checkpoint it belongs to")

    @property
    def parallelism(self) -> int:
        return self.inner.parallelism

    @property
    def parallel_writes(self) -> int:
        return self.inner.parallel_writes

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.flush()

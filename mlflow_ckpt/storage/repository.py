"""Any store MLflow has an artifact repository for (S3, Azure, GCS, ``mlflow-artifacts:``...).

Files are staged one at a time in a local temporary folder and uploaded when the writer
closes, so a remote save never needs a full local copy of the checkpoint. Uploads of the
manifest happen last (the caller's job), which makes the object store's per-object atomicity
enough: a checkpoint without its manifest is never considered committed.
"""

from __future__ import annotations

import contextlib
import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from mlflow_ckpt.storage.base import Store


class RepositoryStore(Store):
    """A folder reached through ``mlflow``'s artifact repository for its URI."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self._repo = get_artifact_repository(uri)

    @contextlib.contextmanager
    def open_writer(self, rel_path: str) -> Iterator[BinaryIO]:
        directory, name = posixpath.split(rel_path)
        staging = Path(tempfile.mkdtemp(prefix="mlflow-ckpt-upload-"))
        try:
            local = staging / name
            with open(local, "xb") as f:
                yield f
            self._repo.log_artifact(str(local), directory or None)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def fetch(self, rel_path: str, scratch_dir: Path) -> Path:
        try:
            return Path(self._repo.download_artifacts(rel_path, dst_path=str(scratch_dir)))
        except Exception as exc:  # each SDK raises its own "not found" type
            if not self.exists(rel_path):
                raise FileNotFoundError(f"{self.uri}/{rel_path}") from exc
            raise

    def exists(self, rel_path: str) -> bool:
        directory, name = posixpath.split(rel_path)
        return any(
            posixpath.basename(info.path) == name and not info.is_dir
            for info in self._repo.list_artifacts(directory or None)
        )

    def delete_all(self) -> None:
        self._repo.delete_artifacts()

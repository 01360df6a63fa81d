"""The one interface every artifact store is reached through.

A checkpoint is a folder of files; the layers above only ever need to write a file
atomically, read one back, check whether one exists and drop the whole folder. Keeping the
interface that small (like torchsnapshot's storage plugins) is what lets the same write path
serve a local folder, S3, Azure, GCS or an ``mlflow server`` proxy.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from mlflow_ckpt.errors import CheckpointError


class StoreError(CheckpointError):
    """An artifact store operation failed (after retries, if it was transient)."""


class Store(abc.ABC):
    """A folder of files in some artifact store, addressed by relative POSIX paths."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    @abc.abstractmethod
    @contextlib.contextmanager
    def open_writer(self, rel_path: str) -> Iterator[BinaryIO]:
        """Yield a binary file; its content becomes visible at ``rel_path`` only on a clean exit.

        If the block raises, nothing is left at ``rel_path`` (and no temporary file either).
        """

    def write_bytes(self, rel_path: str, data: bytes) -> None:
        """Write ``data`` atomically to ``rel_path``."""
        with self.open_writer(rel_path) as f:
            f.write(data)

    @abc.abstractmethod
    def fetch(self, rel_path: str, scratch_dir: Path) -> Path:
        """Return a local path holding the file's bytes (downloaded into ``scratch_dir`` if remote).

        Raises ``FileNotFoundError`` when the file does not exist.
        """

    def read_bytes(self, rel_path: str, scratch_dir: Path) -> bytes:
        """Read a (small) file whole."""
        return self.fetch(rel_path, scratch_dir).read_bytes()

    @abc.abstractmethod
    def exists(self, rel_path: str) -> bool:
        """Whether ``rel_path`` exists in the store."""

    def list_sizes(self, directory: str) -> dict[str, int]:
        """Sizes of the files directly in ``directory`` ("" = the folder), by name.

        What the store reports (a listing, not a download): how a save checks cheaply that
        every file it wrote is really there, whole. Stores override this with a listing.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot list file sizes")

    def list_folders(self, directory: str = "") -> list[str]:
        """Names of the sub-folders directly in ``directory`` ("" = the folder).

        How the run's shared area finds groups that no checkpoint references any more.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot list folders")

    # Storage classes (the cold tier). Stores that have them name their classes; others
    # (a local folder, an ``mlflow server``) archive by recompressing instead.
    cold_class: str | None = None  # the default class of archived checkpoints
    hot_class: str | None = None  # the class an unarchived checkpoint goes back to

    def set_storage_class(self, rel_path: str, storage_class: str) -> None:
        """Move one file to ``storage_class`` in place (its name and bytes stay)."""
        raise NotImplementedError(f"{type(self).__name__} has no storage classes")

    def storage_class(self, rel_path: str) -> str:
        """The storage class (S3), access tier (Azure) or class (GCS) of one file."""
        raise NotImplementedError(f"{type(self).__name__} has no storage classes")

    def delete(self, rel_path: str) -> None:
        """Delete one file (no error if it is already gone)."""
        raise NotImplementedError(f"{type(self).__name__} cannot delete single files")

    @abc.abstractmethod
    def delete_all(self) -> None:
        """Delete every file of this folder (best effort on stores without folders)."""

    @property
    def parallelism(self) -> int:
        """How many files may usefully be transferred or hashed at once."""
        return 2

    @property
    def parallel_writes(self) -> int:
        """How many files may be written at once (each :meth:`open_writer` in its own thread).

        1 unless the store says otherwise: remote stores already overlap uploads with the
        encoding of the next file.
        """
        return 1

    def flush(self) -> None:  # noqa: B027 - stores that write synchronously have nothing to do
        """Wait until every file written so far is durable in the store (raise its error)."""

    def close(self) -> None:
        """Flush and release threads and temporary files."""
        self.flush()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

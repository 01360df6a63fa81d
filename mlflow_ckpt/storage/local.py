"""A folder on the local file system, written with crash-safe atomic renames.

Each file is written to a temporary name in the destination folder, flushed, fsynced and
renamed into place, and the folder itself is fsynced, so a crash at any instant leaves either
the complete old state or the complete new file: never a torn one under the final name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

from mlflow_ckpt.storage.base import Store

TEMP_MARKER = ".mlflow-ckpt-tmp-"


def local_path_of(uri: str) -> Path | None:
    """Return the local path an artifact URI points to, or ``None`` for a remote store."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return Path(uri)
    return None


def fsync_dir(path: Path) -> None:
    """Make a rename or creation inside ``path`` durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class LocalStore(Store):
    """Files under a local directory (the default ``mlruns`` layout, NFS, a mounted bucket)."""

    def __init__(self, uri: str, root: Path) -> None:
        super().__init__(uri)
        self.root = root

    def _path(self, rel_path: str) -> Path:
        return self.root / rel_path

    @property
    def parallel_writes(self) -> int:
        # Shards go to separate files: writing (and fsyncing) several at once keeps a fast
        # disk busy while another shard is being hashed or flushed.
        return max(1, min(4, os.cpu_count() or 1))

    @contextlib.contextmanager
    def open_writer(self, rel_path: str) -> Iterator[BinaryIO]:
        final = self._path(rel_path)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f"{TEMP_MARKER}{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        f = open(tmp, "xb")  # noqa: SIM115 - closed below on every path
        try:
            yield f
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(tmp, final)
            fsync_dir(final.parent)
        except BaseException:
            f.close()
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise

    def fetch(self, rel_path: str, scratch_dir: Path) -> Path:
        path = self._path(rel_path)
        if not path.is_file():
            raise FileNotFoundError(str(path))
        return path

    def exists(self, rel_path: str) -> bool:
        return self._path(rel_path).is_file()

    def list_sizes(self, directory: str) -> dict[str, int]:
        folder = self._path(directory) if directory else self.root
        if not folder.is_dir():
            return {}
        return {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}

    def list_folders(self, directory: str = "") -> list[str]:
        folder = self._path(directory) if directory else self.root
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_dir())

    def delete(self, rel_path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(rel_path).unlink()

    def delete_all(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

"""Any store MLflow has an artifact repository for (S3, Azure, GCS, ``mlflow-artifacts:``...).

The stores we know write each file straight from memory, in parts (see
:mod:`mlflow_ckpt.storage.streaming`): a remote save writes no byte to local disk. Any other
artifact repository gets each file staged in a local temporary folder and handed to a
bounded pool of upload threads when its writer closes (at most ``max_workers + 1`` files on
local disk at a time). Either way uploads overlap with encoding the next shard, and
:meth:`flush` waits for every upload; the caller
flushes before writing the manifest, so the manifest (the commit marker) is always the last
object to appear. Transient failures are retried with backoff; permanent ones are raised at
once as :class:`StoreError` naming the store and the likely fix.
"""

from __future__ import annotations

import contextlib
import posixpath
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

# The factory MLflow itself uses for an artifact URI (plugins included); no public API returns
# a repository. Unchanged from MLflow 3.0.0 to 3.17.2 (.ci/compat).
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from mlflow_ckpt.storage.base import Store, StoreError
from mlflow_ckpt.storage.retry import with_retries
from mlflow_ckpt.storage.staging import OwnedFolder, new_staging_dir
from mlflow_ckpt.storage.streaming import PartSink, StreamingWriter
from mlflow_ckpt.storage.transfer import TransferConfig, explain, redact


class RepositoryStore(Store):
    """A folder reached through ``mlflow``'s artifact repository for its URI."""

    def __init__(self, uri: str, config: TransferConfig | None = None) -> None:
        super().__init__(uri)
        self.config: TransferConfig = config or TransferConfig()
        self._repo = get_artifact_repository(uri)
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.config.max_workers + 1)
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future[None]] = []
        self._bar: Any = None
        self._moved = 0

    @property
    def parallelism(self) -> int:
        return self.config.max_workers

    _prefix = ""  # a bucket store's object-name prefix (its URI's path), set by it

    def _key(self, rel_path: str) -> str:
        """The object name of ``rel_path`` in a bucket store (S3, Azure, GCS)."""
        return posixpath.join(self._prefix, rel_path) if rel_path else self._prefix

    def _run(self, fn: Any, action: str) -> Any:
        try:
            return with_retries(fn, self.config.retry, f"{action} {redact(self.uri)}")
        except Exception as exc:
            raise StoreError(explain(exc, action, self.uri)) from None

    @contextlib.contextmanager
    def open_writer(self, rel_path: str) -> Iterator[BinaryIO]:
        directory, name = posixpath.split(rel_path)
        sink = self._sink(directory, name)
        if sink is None:  # a store we cannot write from memory: stage the file locally
            with self._staged_writer(rel_path) as staged:
                yield staged
            return
        writer = StreamingWriter(
            self, sink, rel_path, self.config.part_bytes, self.config.single_put_bytes
        )
        try:
            yield writer  # type: ignore[misc]
        except BaseException:
            writer.abort()
            raise
        future = writer.close()
        with self._lock:
            self._pending.append(future)

    def _sink(self, directory: str, name: str) -> PartSink | None:
        """How to write ``directory/name`` from memory; ``None``: stage it on local disk.

        The stores we know (S3, Azure, GCS, ``mlflow server``) override this; any other
        MLflow artifact repository gets the staged upload through its ``log_artifact``.
        """
        return None

    # -- PartUploads: what a StreamingWriter needs from its store

    def acquire_part(self) -> None:
        self._slots.acquire()  # bounds the part buffers in memory

    def release_part(self) -> None:
        self._slots.release()

    def submit(self, fn: Callable[[], Any]) -> Future[Any]:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    self.config.max_workers, thread_name_prefix="mlflow-ckpt-upload"
                )
            return self._pool.submit(fn)

    def attempt(self, fn: Callable[[], Any], action: str, retry: bool = True) -> Any:
        if retry:
            return self._run(fn, action)
        try:
            return fn()
        except Exception as exc:
            raise StoreError(explain(exc, action, self.uri)) from None

    def progress(self, size: int) -> None:
        self._progress("upload", size)

    @contextlib.contextmanager
    def _staged_writer(self, rel_path: str) -> Iterator[BinaryIO]:
        directory, name = posixpath.split(rel_path)
        self._slots.acquire()  # bounds the local spool
        staging = new_staging_dir()
        handed_over = False
        try:
            local = staging.path / name
            with open(local, "xb") as f:
                yield f
            size = local.stat().st_size

            def upload() -> None:
                # The folder goes inside the job, not in a done-callback: those run after
                # the future's waiters wake, so flush() could return with it still there.
                try:
                    self._upload(local, directory, rel_path, size)
                finally:
                    self._release(staging)

            future = self.submit(upload)
            handed_over = True
            with self._lock:
                self._pending.append(future)
        finally:
            if not handed_over:
                self._release(staging)

    def _release(self, staging: OwnedFolder) -> None:
        staging.remove()
        self._slots.release()

    def _upload(self, local: Path, directory: str, rel_path: str, size: int) -> None:
        self._run(lambda: self._put(local, directory), f"upload {rel_path} to")
        self._progress("upload", size)

    def _progress(self, label: str, size: int) -> None:
        """Count transferred bytes on a tqdm bar, opened once enough bytes have moved."""
        with self._lock:
            self._moved += size
            if self._bar is None and self.config.show_progress(self._moved):
                from tqdm import tqdm

                self._bar = tqdm(desc=label, unit="B", unit_scale=True, leave=False)
                size = self._moved
            if self._bar is not None:
                self._bar.update(size)

    def _put(self, local: Path, directory: str) -> None:
        """Upload one staged file into ``directory`` (relative to the store's URI)."""
        self._repo.log_artifact(str(local), directory or None)

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        errors = []
        for future in pending:
            try:
                future.result()
            except Exception as exc:
                errors.append(exc)
        with self._lock:
            self._moved = 0
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        if errors:
            raise errors[0]

    def close(self) -> None:
        try:
            self.flush()
        finally:
            with self._lock:
                pool, self._pool = self._pool, None
            if pool is not None:
                pool.shutdown(wait=True)

    # -- reads and deletes. Each is one call per attempt under our retries; the stores we know
    # override these with their SDK's own calls, made with the SDK's retries off (any other
    # MLflow repository retries as it was built to, and ours run on top).

    def _listing(self, directory: str) -> tuple[dict[str, int], list[str]]:
        """Sizes of the files directly in ``directory`` by name, and its sub-folders."""
        listing = self._repo.list_artifacts(directory or None)
        files = {posixpath.basename(i.path): int(i.file_size or 0) for i in listing if not i.is_dir}
        folders = [posixpath.basename(i.path.rstrip("/")) for i in listing if i.is_dir]
        return files, folders

    def _download(self, rel_path: str, target: Path) -> Path:
        """Download one file into the folder ``target``; return its local path."""
        return Path(self._repo.download_artifacts(rel_path, dst_path=str(target)))

    def _remove(self, rel_path: str) -> None:
        """Delete one file."""
        self._repo.delete_artifacts(rel_path)

    def _remove_all(self) -> None:
        """Delete every file under the store's URI."""
        self._repo.delete_artifacts()

    def fetch(self, rel_path: str, scratch_dir: Path) -> Path:
        target = scratch_dir / uuid.uuid4().hex[:8]
        target.mkdir(parents=True)
        try:
            path: Path = self._run(
                lambda: self._download(rel_path, target), f"download {rel_path} from"
            )
            self._progress("download", path.stat().st_size)
            return path
        except StoreError as exc:
            if not self.exists(rel_path):
                raise FileNotFoundError(f"{redact(self.uri)}/{rel_path}") from exc
            raise

    def exists(self, rel_path: str) -> bool:
        directory, name = posixpath.split(rel_path)
        return name in self.list_sizes(directory)

    def list_sizes(self, directory: str) -> dict[str, int]:
        return dict(self._run(lambda: self._listing(directory), "list")[0])

    def list_folders(self, directory: str = "") -> list[str]:
        return sorted(self._run(lambda: self._listing(directory), "list")[1])

    def delete(self, rel_path: str) -> None:
        if self.exists(rel_path):
            self._run(lambda: self._remove(rel_path), f"delete {rel_path} from")

    def delete_all(self) -> None:
        self._run(self._remove_all, "delete")

"""Any store MLflow has an artifact repository for (S3, Azure, GCS, ``mlflow-artifacts:``...).

Each file is staged in a local temporary folder and handed to a bounded pool of upload
threads when its writer closes, so a remote save never needs a full local copy of the
checkpoint: at most ``max_workers + 1`` files are on local disk at a time, and uploads
overlap with encoding the next shard. :meth:`flush` waits for every upload; the caller
flushes before writing the manifest, so the manifest (the commit marker) is always the last
object to appear. Transient failures are retried with backoff; permanent ones are raised at
once as :class:`StoreError` naming the store and the likely fix.
"""

from __future__ import annotations

import contextlib
import posixpath
import shutil
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from mlflow_ckpt.storage.base import Store, StoreError
from mlflow_ckpt.storage.retry import with_retries
from mlflow_ckpt.storage.staging import new_staging_dir
from mlflow_ckpt.storage.transfer import TransferConfig, explain, redact


class RepositoryStore(Store):
    """A folder reached through ``mlflow``'s artifact repository for its URI."""

    def __init__(self, uri: str, config: TransferConfig | None = None) -> None:
        super().__init__(uri)
        self.config = config or TransferConfig()
        self._repo = get_artifact_repository(uri)
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.config.max_workers + 1)
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future[None]] = []
        self._bar: Any = None

    @property
    def parallelism(self) -> int:
        return self.config.max_workers

    def _run(self, fn: Any, action: str) -> Any:
        try:
            return with_retries(fn, self.config.retry, f"{action} {redact(self.uri)}")
        except Exception as exc:
            raise StoreError(explain(exc, action, self.uri)) from None

    @contextlib.contextmanager
    def open_writer(self, rel_path: str) -> Iterator[BinaryIO]:
        directory, name = posixpath.split(rel_path)
        self._slots.acquire()  # bounds the local spool
        staging = new_staging_dir()
        handed_over = False
        try:
            local = staging / name
            with open(local, "xb") as f:
                yield f
            size = local.stat().st_size
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(
                        self.config.max_workers, thread_name_prefix="mlflow-ckpt-upload"
                    )
                future = self._pool.submit(self._upload, local, directory, rel_path, size)
                self._pending.append(future)
            future.add_done_callback(lambda _: self._release(staging))
            handed_over = True
        finally:
            if not handed_over:
                self._release(staging)

    def _release(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)
        self._slots.release()

    def _upload(self, local: Path, directory: str, rel_path: str, size: int) -> None:
        self._run(lambda: self._put(local, directory), f"upload {rel_path} to")
        self._progress("upload", size)

    def _progress(self, label: str, size: int) -> None:
        """Count transferred bytes on a tqdm bar, opened by the first large enough file."""
        with self._lock:
            if self._bar is None and self.config.show_progress(size):
                from tqdm import tqdm

                self._bar = tqdm(desc=label, unit="B", unit_scale=True, leave=False)
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

    def fetch(self, rel_path: str, scratch_dir: Path) -> Path:
        target = scratch_dir / uuid.uuid4().hex[:8]
        target.mkdir(parents=True)

        def download() -> Path:
            return Path(self._repo.download_artifacts(rel_path, dst_path=str(target)))

        try:
            path: Path = self._run(download, f"download {rel_path} from")
            self._progress("download", path.stat().st_size)
            return path
        except StoreError as exc:
            if not self.exists(rel_path):
                raise FileNotFoundError(f"{redact(self.uri)}/{rel_path}") from exc
            raise

    def exists(self, rel_path: str) -> bool:
        directory, name = posixpath.split(rel_path)
        listing = self._run(lambda: self._repo.list_artifacts(directory or None), "list")
        return any(posixpath.basename(i.path) == name and not i.is_dir for i in listing)

    def list_sizes(self, directory: str) -> dict[str, int]:
        listing = self._run(lambda: self._repo.list_artifacts(directory or None), "list")
        return {posixpath.basename(i.path): int(i.file_size or 0) for i in listing if not i.is_dir}

    def delete_all(self) -> None:
        self._run(self._repo.delete_artifacts, "delete")

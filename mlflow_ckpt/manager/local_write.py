"""The save strategy of a single process: the whole state in one folder of files.

A world of one rank (:meth:`~.ranks.RankGroup.alone`): :func:`.pipeline.write_checkpoint`
runs the same protocol as for a distributed job, and this strategy writes the part of its
only rank, the complete folder (:func:`~mlflow_ckpt.folder.write_folder`, manifest last,
after ``before_manifest`` has checked the lease and the NaN/inf guard's verdict).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from mlflow.entities import LoggedModel

from mlflow_ckpt.catalog.checkpoint import Checkpoint
from mlflow_ckpt.codec import Manifest
from mlflow_ckpt.folder import FolderSpec, write_folder
from mlflow_ckpt.folder.incremental import Base
from mlflow_ckpt.manager.pipeline import SaveJob
from mlflow_ckpt.manager.ranks import RankGroup
from mlflow_ckpt.snapshot import Snapshot, first_nonfinite, take_snapshot
from mlflow_ckpt.snapshot.changes import History
from mlflow_ckpt.snapshot.sharded import ShardedSnapshot
from mlflow_ckpt.storage import Store

if TYPE_CHECKING:
    from mlflow_ckpt.manager.resume import ResumePoint


class LocalSave:
    """One process writes every checkpoint of its run whole, or incrementally against the
    newest one (``shared_uri``: the run's shared area)."""

    def __init__(
        self, state: Mapping[str, Any], spec: FolderSpec, run_id: str, shared_uri: str | None
    ) -> None:
        self.ranks = RankGroup.alone()
        self.state, self.spec, self.run_id, self.shared_uri = state, spec, run_id, shared_uri
        self.base: Base | None = None  # the newest checkpoint the next save may reference
        self._manifest: Manifest | None = None  # the one the part in flight wrote

    def snapshot(
        self, progress: Mapping[str, Any], *, copy: bool, buffers: Any, whole: bool
    ) -> tuple[Snapshot, ShardedSnapshot | None]:
        history = None
        if self.shared_uri is not None:
            history = self.base.history() if self.base is not None and not whole else History()
        snapshot = take_snapshot(self.state, progress, copy=copy, buffers=buffers, history=history)
        return snapshot, None

    def first_nonfinite(self, job: SaveJob) -> str | None:
        return first_nonfinite(job.snapshot)

    def write_part(
        self, store: Store | None, job: SaveJob, model_id: str, before_manifest: Callable[[], None]
    ) -> dict[str, Any]:
        if store is None:
            raise ValueError("no store to write to")  # (opening it failed: that error wins)
        self._manifest = write_folder(
            store,
            job.snapshot,
            self.spec,
            model_id=model_id,
            run_id=self.run_id,
            step=job.step,
            epoch=job.epoch,
            metrics=job.metrics,
            triggers=job.triggers,
            created_at=job.timestamp_ms / 1000,
            before_manifest=before_manifest,
            base=None if job.self_contained else self.base,
        )
        return {}

    def write_root(
        self,
        store: Store,
        job: SaveJob,
        model: LoggedModel,
        parts: list[dict[str, Any]],
        before_manifest: Callable[[], None],
    ) -> Manifest:
        assert self._manifest is not None  # written whole by the only rank's part
        return self._manifest

    def committed(self, job: SaveJob, checkpoint: Checkpoint) -> None:
        if self.shared_uri is not None and self._manifest is not None:
            seen = job.snapshot.changes.seen if job.snapshot.changes else {}
            self.base = Base(checkpoint.model_id, self._manifest, seen)
        self._manifest = None

    def resumed(self, point: ResumePoint) -> None:
        checkpoint, manifest = point.checkpoint, point.manifest
        if checkpoint is None or manifest is None or self.shared_uri is None:
            return
        if manifest.shared_uri in (None, self.shared_uri):  # (not another run's area)
            self.base = Base(checkpoint.model_id, manifest, point.frozen)

    def protected(self, last: Checkpoint | None) -> tuple[str, ...]:
        return self.base.manifest.shared_groups if self.base is not None else ()

"""How a due save is carried out: snapshot, then the write path inline or in the background.

:class:`Saver` owns what happens after the manager has decided *that* a step is saved: the
in-memory snapshot on the training thread, the :class:`~.pipeline.SaveJob`, running it (and
the metric logging of other steps) inline for sync saves or on the one background worker
for async ones, at most one save in flight, retention after each commit, and the
``on_error`` policy for failures, which surface on the training thread either way.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from mlflow import MlflowClient

from mlflow_ckpt.catalog import Checkpoint, models, tags
from mlflow_ckpt.catalog.metrics import log_step_metrics_quietly
from mlflow_ckpt.catalog.shared import shared_area_uri, sweep_shared
from mlflow_ckpt.catalog.timeline import NONFINITE_METRIC
from mlflow_ckpt.errors import (
    CheckpointError,
    CheckpointVerificationError,
    CheckpointWriteError,
    NonFiniteStateError,
)
from mlflow_ckpt.folder.incremental import Base
from mlflow_ckpt.manager.distributed_write import first_nonfinite_everywhere, write_distributed
from mlflow_ckpt.manager.metrics import StepMetrics, now_ms
from mlflow_ckpt.manager.milestones import Milestones
from mlflow_ckpt.manager.options import ManagerOptions
from mlflow_ckpt.manager.pipeline import (
    SaveJob,
    WriteTarget,
    log_unsaved_metrics,
    write_checkpoint,
)
from mlflow_ckpt.manager.policies import Decision
from mlflow_ckpt.manager.retention import RunRetention, apply_retention
from mlflow_ckpt.manager.session import Session
from mlflow_ckpt.manager.worker import BackgroundWorker
from mlflow_ckpt.snapshot import first_nonfinite, preserved_python_rng, take_snapshot
from mlflow_ckpt.snapshot.changes import History, Seen
from mlflow_ckpt.snapshot.host_buffers import HostBuffers
from mlflow_ckpt.snapshot.sharded import sharded_entries, take_sharded

if TYPE_CHECKING:  # (DCP is imported only by distributed saves)
    from mlflow_ckpt.codec.dcp_metadata import ChunkBase
    from mlflow_ckpt.manager.resume import ResumePoint

logger = logging.getLogger(__name__)


class Saver:
    """Runs the saves and metric logging of one manager."""

    def __init__(self, state: Mapping[str, Any], options: ManagerOptions, session: Session) -> None:
        client: MlflowClient = session.client  # type: ignore[assignment] # None off rank 0
        run_id, experiment_id, ranks = session.run_id, session.experiment_id, session.ranks
        lease = session.claim.lease if session.claim is not None else None
        # Incremental saves keep lasting bytes in the run's shared area (catalog.shared).
        # (Distributed: rank 0 knows it and hands it to the other ranks at each save.)
        self.shared_uri = (
            shared_area_uri(session.run.info.artifact_uri)
            if options.incremental and session.run is not None
            else None
        )
        self.base: Base | None = None  # the newest checkpoint the next save may reference
        self.milestones = Milestones(options.retention, options.incremental, run_id)
        self.chunk_base: ChunkBase | None = None  # distributed: this rank's previous chunks
        self.chunk_seen: dict[str, Seen] = {}  # ... and what that save's snapshot saw
        self.state, self.ranks = state, ranks
        # Distributed: modules and optimizers go through DCP, the rest is this rank's own.
        self.sharded = sharded_entries(state) if ranks is not None else {}
        self.own_state = {k: v for k, v in state.items() if k not in self.sharded}
        self.options, self.client, self.run_id = options, client, run_id
        self.target = WriteTarget(
            client=client,
            run_id=run_id,
            experiment_id=experiment_id,
            spec=options.spec,
            transfer=options.transfer,
            check_writer=lease.check if lease is not None else None,
            writer_id=lease.owner if lease is not None else "",
            log_metrics=options.log_metrics,
            verify=options.verify,
            shared_uri=self.shared_uri,
        )
        self.metrics = StepMetrics(
            client, run_id, enabled=options.log_metrics and client is not None
        )
        self.worker = BackgroundWorker(f"mlflow-ckpt-{run_id[:8]}") if options.async_save else None
        self.retention = (
            RunRetention(
                client,
                run_id,
                experiment_id,
                options.retention,
                self.shared_uri,
                self._protected,
                options.archive,
            )
            if options.retention is not None and client is not None
            else None
        )
        # async: each snapshot reuses the previous one's host memory (a shorter stall)
        self.buffers = HostBuffers() if options.async_save else None
        self.last_checkpoint: Checkpoint | None = None
        self.last_saved_step: int | None = None
        self.last_save_time = time.monotonic()
        self._nonfinite_step = session.nonfinite_step  # the first step refused so far

    def save(
        self,
        step: int,
        epoch: int | None,
        triggers: Iterable[str],
        *,
        end_of_epoch: bool,
        manager_state: Mapping[str, Any],
        inline: bool = False,
    ) -> float:
        """Snapshot the state now and write it as the checkpoint of ``step``.

        Returns how long training waited: the snapshot (and a previous save still in flight)
        for async saves, the whole save for sync and ``inline`` ones (written here, now).
        """
        started = time.perf_counter()
        if self.worker is not None:
            self.worker.wait_for_saves()  # one save in flight: at most one extra host copy
            self.raise_background_error()
        pending = self.metrics.take_for(step)
        metrics = pending.metrics if pending else {}
        progress = {
            "step": step,
            "epoch": epoch,
            "end_of_epoch": end_of_epoch,
            "metrics": metrics,
            "manager": dict(manager_state),
        }
        copy = self.worker is not None and not inline
        if self.buffers is not None:
            self.buffers.recycle()  # no save in flight: the previous snapshot is written
        whole = self.milestones.whole(step)  # copied whole, referencing nothing (see there)
        history = None
        if self.shared_uri is not None and self.ranks is None:
            history = self.base.history() if self.base is not None and not whole else History()
        snapshot = take_snapshot(
            self.own_state, progress, copy=copy, buffers=self.buffers, history=history
        )
        sharded = None
        if self.ranks:
            sharded_history = None
            if self.options.incremental:  # (rank 0 alone knows the shared area's URI)
                names: frozenset[str] = frozenset()
                if self.chunk_base is not None and not whole:
                    names = self.chunk_base.shared_names()
                sharded_history = History(self.chunk_seen, names)
            sharded = take_sharded(
                self.state, self.sharded, copy=copy, buffers=self.buffers, history=sharded_history
            )
        job = SaveJob(
            snapshot=snapshot,
            step=step,
            epoch=epoch,
            metrics=metrics,
            triggers=tuple(triggers),
            timestamp_ms=pending.timestamp_ms if pending else now_ms(),
            previous_step=self.last_checkpoint.step if self.last_checkpoint else None,
            sharded=sharded,
            progress=progress,
            base=None if whole else self.base,
            chunk_base=None if whole else self.chunk_base,
            self_contained=whole,
        )
        self.last_saved_step = step
        self.last_save_time = time.monotonic()
        self._run(lambda: self._write(job), is_save=True, inline=inline)
        if self.retention is not None and self.options.archive is not None:
            self._run(self.retention.archive_due, is_save=False)  # not awaited by snapshots
        return time.perf_counter() - started

    def follow(self, step: int, decision: Decision) -> None:
        """Carry out what the policies decided at ``step`` besides saving: pin the newest
        checkpoint before a spike; log what they report (even with ``log_metrics=False``:
        the adaptive interval is the library's own record)."""
        if decision.spike is not None:
            self._pin_newest(step, decision.spike)
        if decision.reports:
            stamp, reports = now_ms(), decision.reports
            self._run(
                lambda: log_step_metrics_quietly(
                    self.client, self.run_id, reports, step=step, timestamp_ms=stamp
                ),
                is_save=False,
            )

    def _pin_newest(self, spike_step: int, detail: str) -> None:
        """Pin the newest committed checkpoint before ``spike_step`` (after saves in flight)."""

        def pin() -> None:
            ckpt = self.last_checkpoint
            if ckpt is None or ckpt.step >= spike_step:
                logger.warning("Spike at step %d (%s): no checkpoint before it", spike_step, detail)
                return
            try:
                models.set_pinned(self.client, ckpt.model_id, tags.PRE_SPIKE)
            except Exception as exc:  # protective bookkeeping: never fail a training step
                logger.warning(
                    "Could not pin checkpoint %s (step %d) of run %s before the spike at "
                    "step %d: %s; `mlflow-ckpt pin %s` does it by hand",
                    ckpt.uri,
                    ckpt.step,
                    self.run_id,
                    spike_step,
                    exc,
                    ckpt.uri,
                )
                return
            self.last_checkpoint = dataclasses.replace(ckpt, pinned=tags.PRE_SPIKE)
            logger.warning(
                "Spike at step %d of run %s (%s): pinned checkpoint %s (step %d); retention "
                "keeps it until `mlflow-ckpt unpin`",
                spike_step,
                self.run_id,
                detail,
                ckpt.uri,
                ckpt.step,
            )

        self._run(pin, is_save=False)

    def flush_metrics(self) -> None:
        """Log the held step's metrics (not linked to a checkpoint)."""
        job = self.metrics.take_job()
        if job is not None:
            self._run(job, is_save=False)

    def wait(self) -> None:
        """Block until every pending save and metric is committed; raise a background error."""
        self.flush_metrics()
        if self.worker is not None:
            self.worker.drain()
        self.raise_background_error()

    def wait_for_saves(self) -> None:
        """Block until no save is queued or running (metric jobs may still be)."""
        if self.worker is not None:
            self.worker.wait_for_saves()

    def raise_background_error(self) -> None:
        error = self.worker.take_error() if self.worker is not None else None
        if error is not None:
            self._failed(error)

    def resumed(self, point: ResumePoint) -> int:
        """Carry on from ``point.checkpoint``, just restored: the next save follows it and,
        when incremental, references its shared bytes, unread for the frozen parameters the
        restore wrote (as the restore left them). Returns its step."""
        checkpoint, manifest = point.checkpoint, point.manifest
        assert checkpoint is not None
        self.last_checkpoint, self.last_saved_step = checkpoint, checkpoint.step
        if self.ranks is not None and self.options.incremental:  # (only rank 0 knows the
            # shared URI, but the run's own checkpoints, all a resume restores, store there)
            self.chunk_base, self.chunk_seen = point.chunk_base, dict(point.frozen)
        usable = manifest is not None and manifest.shared_uri in (None, self.shared_uri)
        if self.ranks is None and self.shared_uri is not None and usable:  # (not another run's)
            self.base = Base(checkpoint.model_id, manifest, point.frozen)  # type: ignore[arg-type]
        return checkpoint.step

    def _protected(self) -> tuple[str, ...]:
        """Shared groups the next save may reference: never deleted meanwhile."""
        if self.ranks is not None:  # every rank's chunks of the newest checkpoint
            return self.last_checkpoint.shared if self.last_checkpoint is not None else ()
        return self.base.manifest.shared_groups if self.base is not None else ()

    def final_retention(self) -> None:
        """At ``close()``: one retention pass over a fresh listing of the run, then a sweep
        of the run's shared area (groups left by failed saves or deleted checkpoints)."""
        if self.retention is not None:
            apply_retention(
                self.client,
                self.run_id,
                self.retention.policy,
                experiment_id=self.target.experiment_id,
                archive=self.options.archive,
            )
        if self.shared_uri is not None and self.client is not None:
            sweep_shared(
                self.client,
                self.run_id,
                self.target.experiment_id,
                self.shared_uri,
                protect=self._protected(),
                config=self.options.transfer,
            )

    def stop(self) -> None:
        """Run what is queued, then end the worker thread."""
        if self.worker is not None:
            self.worker.stop()
        if self.buffers is not None:
            self.buffers.clear()

    def _run(self, job: Callable[[], None], *, is_save: bool, inline: bool = False) -> None:
        """Run ``job`` on the worker (async) or here, where its failure is handled now."""
        if self.worker is not None and not inline:
            self.worker.submit(job, is_save=is_save)
            return
        try:
            job()
        except CheckpointError as exc:
            self._failed(exc)

    def _write(self, job: SaveJob) -> None:
        """Write and commit one checkpoint, then apply retention (on the worker if async)."""
        if self.options.nonfinite != "save":
            tensor = (
                first_nonfinite(job.snapshot)
                if self.ranks is None
                else first_nonfinite_everywhere(job, self.ranks)
            )
            if tensor is not None:
                self._refuse_nonfinite(job, tensor)
                return
        try:
            if self.ranks is None:
                self.last_checkpoint, manifest = write_checkpoint(self.target, job)
                if self.shared_uri is not None:
                    seen = job.snapshot.changes.seen if job.snapshot.changes else {}
                    self.base = Base(self.last_checkpoint.model_id, manifest, seen)
            else:
                self.last_checkpoint, self.chunk_base = write_distributed(
                    self.target, job, self.ranks
                )
                changes = job.sharded.changes if job.sharded is not None else None
                self.chunk_seen = changes.seen if changes is not None else {}
        except CheckpointVerificationError:
            raise  # written and refused: saving the same step again at close would not help
        except CheckpointError:
            if self.last_saved_step == job.step:  # let save_last retry this step at close
                self.last_saved_step = self.last_checkpoint.step if self.last_checkpoint else None
            raise
        del job
        if self.retention is not None:
            self.retention.committed(self.last_checkpoint)
            self.retention.apply()  # (archived by the job after this one)

    def _refuse_nonfinite(self, job: SaveJob, tensor: str) -> None:
        """Leave a diverged state uncommitted: warn (``"skip"``) or raise (``"raise"``).

        Nothing is created in MLflow but the step's metrics and, the first time, the run tag
        ``mlflow_ckpt.nonfinite_step``; so retention can never push the last finite
        checkpoint out.
        """
        log_unsaved_metrics(self.target, job, marks={NONFINITE_METRIC: 1.0})  # for timelines
        if self._nonfinite_step is None and self.client is not None:
            self._nonfinite_step = str(job.step)
            try:
                with preserved_python_rng():
                    self.client.set_tag(self.run_id, tags.RUN_NONFINITE_STEP, str(job.step))
            except Exception as exc:
                logger.warning(
                    "Could not tag run %s with %s: %s", self.run_id, tags.RUN_NONFINITE_STEP, exc
                )
        newest = (
            f"the checkpoint of step {job.previous_step} is the newest good one"
            if job.previous_step is not None
            else "the run has no earlier checkpoint"
        )
        message = (
            f"Step {job.step} of run {self.run_id} was not saved: its state holds NaN or inf "
            f"(first in {tensor!r}), so training has diverged; {newest}."
        )
        if self.options.nonfinite == "raise":
            remedy = (
                "Resume from it (CheckpointManager.resume) with a lower learning rate"
                if job.previous_step is not None
                else "Lower the learning rate and start again"
            )
            raise NonFiniteStateError(
                f"{message} {remedy}, or pass nonfinite='skip' to keep training without saving."
            )
        logger.warning("%s", message)
        warnings.warn(f"{message} Training goes on (nonfinite='skip').", stacklevel=2)

    def _failed(self, error: BaseException) -> None:
        """Raise a failed save's error, or only warn about it with ``on_error="warn"``.

        A lost writer lease always raises: going on would write a run another process owns.
        """
        if self.options.on_error == "warn" and isinstance(error, CheckpointWriteError):
            logger.warning("%s", error)
            warnings.warn(f"{error} Training goes on (on_error='warn').", stacklevel=5)
            return
        raise error

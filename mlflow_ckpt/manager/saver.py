"""How a due save is carried out: snapshot, then the write path inline or in the background.

:class:`Saver` owns what happens after the manager has decided *that* a step is saved: the
in-memory snapshot on the training thread, the :class:`~.pipeline.SaveJob`, running it (and
the metric logging of other steps) inline for sync saves or on the one background worker
for async ones, at most one save in flight, retention after each commit, and the
``on_error`` policy for failures, which surface on the training thread either way.

It never asks whether the job is distributed: a :class:`~.pipeline.SaveStrategy`, chosen
once (:class:`~.local_write.LocalSave` for one process, :class:`~.distributed_write.ShardedSave`
for a job's ranks), takes the snapshots, writes the parts and keeps what the next save
builds on; :func:`~.pipeline.write_checkpoint` runs the one commit protocol for both.
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
    WriterConflictError,
)
from mlflow_ckpt.manager.distributed_write import ShardedSave
from mlflow_ckpt.manager.local_write import LocalSave
from mlflow_ckpt.manager.metrics import StepMetrics, now_ms
from mlflow_ckpt.manager.options import ManagerOptions
from mlflow_ckpt.manager.pipeline import (
    Diverged,
    SaveJob,
    SaveStrategy,
    WriteTarget,
    log_unsaved_metrics,
    write_checkpoint,
)
from mlflow_ckpt.manager.policies import Decision
from mlflow_ckpt.manager.retention import Milestones, RunRetention, apply_retention
from mlflow_ckpt.manager.session import Session
from mlflow_ckpt.manager.worker import BackgroundWorker
from mlflow_ckpt.snapshot import preserved_python_rng
from mlflow_ckpt.snapshot.host_buffers import HostBuffers

if TYPE_CHECKING:
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
        self.milestones = Milestones(options.retention, options.incremental, run_id)
        self.strategy: SaveStrategy = (
            ShardedSave(state, ranks, options.spec, run_id, options.incremental)
            if ranks is not None
            else LocalSave(state, options.spec, run_id, self.shared_uri)
        )
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
            check_finite=options.nonfinite != "save",
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
        self.conflict: str | None = None  # the run was taken over: every later call raises

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
        snapshot, sharded = self.strategy.snapshot(
            progress, copy=copy, buffers=self.buffers, whole=whole
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
            if ckpt.run_id != self.run_id:  # a fork's source: only ever read
                logger.warning(
                    "Spike at step %d (%s): the checkpoint before it is %s of run %s, which "
                    "this run was forked from; a fork never changes its source, so it is "
                    "not pinned (the fork's tag mlflow_ckpt.forked_from names it)",
                    spike_step,
                    detail,
                    ckpt.uri,
                    ckpt.run_id,
                )
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
        checkpoint = point.checkpoint
        assert checkpoint is not None
        self.last_checkpoint, self.last_saved_step = checkpoint, checkpoint.step
        self.strategy.resumed(point)
        return checkpoint.step

    def _protected(self) -> tuple[str, ...]:
        """Shared groups the next save may reference: never deleted meanwhile."""
        return self.strategy.protected(self.last_checkpoint)

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
        try:
            self.last_checkpoint = write_checkpoint(self.target, job, self.strategy)
        except Diverged as diverged:  # discarded: the step is not saved (nor retried)
            self._refuse_nonfinite(job, diverged.tensor)
            return
        except WriterConflictError as exc:  # raised on every rank: all stop here
            self.conflict = str(exc)
            raise
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

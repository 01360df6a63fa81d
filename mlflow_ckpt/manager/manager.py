"""``CheckpointManager``: one call in the training loop saves, logs and later resumes.

The manager decides *when* (policies) and owns the run (the writer lease, resume); its parts beside
it do the rest: options, step metrics, the saver (snapshot, then the one write path inline
or on the background worker), retention. This module is its public face (every option, the
training-loop calls, the views); :mod:`.lifecycle` holds what those calls stand on.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from mlflow import MlflowClient

from mlflow_ckpt.catalog import Checkpoint, tags
from mlflow_ckpt.codec import DEFAULT_MAX_SHARD_BYTES
from mlflow_ckpt.errors import CheckpointError, WriterConflictError
from mlflow_ckpt.manager.lease import DEFAULT_TTL_S
from mlflow_ckpt.manager.lifecycle import ManagerLifecycle
from mlflow_ckpt.manager.metrics import clean_metrics
from mlflow_ckpt.manager.options import (
    OptionView,
    build_options,
    check_state,
    option_arguments,
)
from mlflow_ckpt.manager.preemption import DEFAULT_GRACE_S
from mlflow_ckpt.manager.records import log_timeline
from mlflow_ckpt.manager.retention import RetentionPolicy
from mlflow_ckpt.manager.triggers import StepInfo, Trigger
from mlflow_ckpt.storage import TransferConfig

logger = logging.getLogger(__name__)


class CheckpointManager(ManagerLifecycle):
    """Saves the whole training state as MLflow LoggedModels and resumes from them.

    ``state`` maps names to objects with ``state_dict()``/``load_state_dict()`` (modules,
    optimizers, schedulers, ``GradScaler``, samplers...), ``torch.Generator``/``random.Random``
    /NumPy generators, tensors, or nested dicts/lists of tensors and numbers. The global
    Python, NumPy and torch (CPU and CUDA) random streams are added automatically.

    Call :meth:`step` after each finished step (0-based): it saves when a trigger is due and
    logs the step's metrics to the run. Under ``torch.distributed`` build it on every rank
    (only rank 0 needs a run; ``distributed=False``: rank 0 alone, single-process format).
    When to save: ``save_every_n_*``, ``monitor``/``mode`` and/or ``triggers=[...]`` (objects
    with ``name`` and ``fires(info)``). What to keep: ``keep_*`` and/or ``retention=`` (an
    object with ``keep(checkpoints)``); a checkpoint survives if any rule keeps it;
    ``archive_after_n`` moves old milestones to the store's cold tier in place. Also:
    ``on_error="warn"`` (train through failed saves), ``nonfinite`` (a NaN/inf state is
    skipped, raised or saved), ``verify`` (``"size"``, ``"hash"`` or ``validate(model)``
    after each save), ``force``/``lease_ttl`` (the run's writer lease), ``log_metrics=False``
    (something else logs the metrics), ``incremental`` (write only what changed; default),
    ``compression="zstd"``, ``transfer``, ``max_shard_bytes``, ``code_paths`` (the model's
    code in each checkpoint), ``timeline`` (a picture logged at ``close()``). The guides
    (``docs/guides/``) explain each; every argument is checked first.

    Preemptible jobs: ``resume="auto"`` (no ``run_id``, no active run needed) opens this
    job's own run, found by its key (``run_name=``, else ``MLFLOW_CKPT_RUN_KEY``,
    ``TORCHELASTIC_RUN_ID``, ``SLURM_JOB_ID``) or started, restores its newest verified
    checkpoint as :meth:`resume` does and leaves the run active, so the same command line
    restarted continues it. ``save_on_signals`` (SIGTERM by default with ``resume="auto"``)
    saves the step a signal comes at, then lets the signal end the process;
    ``preempt_grace_s`` bounds the wait for that step. ``docs/guides/resume.md`` is the guide."""

    def __init__(
        self,
        state: Mapping[str, Any],
        *,
        run_id: str | None = None,
        save_every_n_steps: int | None = None,
        save_every_n_epochs: int | None = None,
        save_every_n_seconds: float | str | None = None,
        mtbf_hours: float | None = None,
        monitor: str | None = None,
        mode: str = "min",
        keep_last_n: int | None = None,
        keep_best_n: int | None = None,
        keep_every_n_steps: int | None = None,
        archive_after_n: int | None = None,
        save_last: bool = True,
        format: str = "safetensors",
        incremental: bool = True,
        compression: str | None = None,
        compression_level: int = 1,
        async_save: bool = True,
        model_factory: Callable[..., Any] | str | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        triggers: Sequence[Trigger] | None = None,
        retention: RetentionPolicy | None = None,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        code_paths: Sequence[str | Path] = (),
        transfer: TransferConfig | None = None,
        client: MlflowClient | None = None,
        log_metrics: bool = True,
        on_error: str = "raise",
        nonfinite: str = "skip",
        verify: str | Callable[[Any], Any] = "size",
        spike_factor: float | None = None,
        spike_metric: str | None = None,
        timeline: bool = True,
        force: bool = False,
        lease_ttl: float = DEFAULT_TTL_S,
        distributed: bool | None = None,
        resume: str | None = None,
        run_name: str | None = None,
        save_on_signals: str | int | Sequence[str | int] | None = None,
        preempt_grace_s: float = DEFAULT_GRACE_S,
    ) -> None:
        arguments = dict(locals())
        for name in ("self", "state", "run_id"):
            del arguments[name]
        if resume is not None and run_id is not None:
            raise TypeError(
                f"resume={resume!r} opens this job's own run (found by its key); run_id= names "
                "a run to write. Pass one of them, not both."
            )
        options = build_options(arguments)
        check_state(state, options)
        self._open(state, options, run_id, restore=options.job is not None, strict=True)

    @classmethod
    def resume(
        cls,
        run_id: str,
        state: Mapping[str, Any],
        *,
        strict: bool = True,
        **kwargs: Any,
    ) -> CheckpointManager:
        """Continue run ``run_id``: restore the newest checkpoint that verifies, reopen the run.

        Checkpoints whose files fail verification are skipped with a warning and tagged
        ``mlflow_ckpt.status=corrupt``. With no checkpoint the state is left as it is and
        ``start_step`` is 0. ``strict`` refuses checkpoint entries missing from ``state``.
        Other keyword arguments are those of the constructor; they are all checked before
        anything is restored, started or taken. Under ``torch.distributed`` every rank calls
        it, on any world size (sharded state is resharded).
        """
        if kwargs.get("resume") is not None or kwargs.get("run_name") is not None:
            raise TypeError(
                "CheckpointManager.resume(run_id, ...) continues the run it is given; "
                "resume='auto'/run_name= belong to CheckpointManager(...), which finds the "
                "job's run itself"
            )
        options = build_options(option_arguments(inspect.signature(cls.__init__), kwargs))
        check_state(state, options)
        manager = cls.__new__(cls)
        manager._open(state, options, run_id, restore=True, strict=strict)
        return manager

    # ------------------------------------------------------------------ training loop API

    def step(
        self,
        step: int,
        metrics: Mapping[str, Any] | None = None,
        epoch: int | None = None,
        *,
        end_of_epoch: bool = False,
        timestamp_ms: int | None = None,
    ) -> bool:
        """Record finished step ``step`` (0-based): log ``metrics``, save if a trigger is due.

        Pass ``end_of_epoch=True`` on the last step of an epoch for ``save_every_n_epochs``.
        ``timestamp_ms`` stamps the metrics (default: now); autolog passes the timestamp of
        the loop's own ``mlflow.log_metric`` so MLflow keeps one history entry, not two.
        Returns whether a save was started (async: once the state is copied to host memory).
        """
        self._check_usable()
        step, epoch = self._check_step(step, epoch)
        clean = clean_metrics(metrics)
        info = StepInfo(
            step, epoch, clean, end_of_epoch, time.monotonic(), self._saver.last_save_time
        )
        decision = self._policies.decide(info, self._watch.received, self._lost_lease())
        if decision.lost is not None:  # another process owns the run now: stop before logging
            raise WriterConflictError(decision.lost)
        self._saver.follow(step, decision)  # pin before a spike, report a new interval
        fired = decision.fired
        self._saver.flush_metrics()
        self._last_step, self._last_epoch = step, epoch
        self._saver.metrics.hold(step, clean, None if timestamp_ms is None else int(timestamp_ms))
        if decision.preempted is not None:
            self._save_preempted(step, epoch, fired, decision.preempted, end_of_epoch)
        elif fired:
            self._save(step, epoch, fired, end_of_epoch=end_of_epoch)
        return bool(fired)

    def save(
        self, step: int, metrics: Mapping[str, Any] | None = None, epoch: int | None = None
    ) -> bool:
        """Save ``step`` now (trigger ``manual``), unless it is already saved.

        ``metrics`` are logged at ``step`` and linked to the checkpoint, merged with those
        given to :meth:`step` for the same step.
        """
        self._check_usable()
        clean = clean_metrics(metrics)
        pending = self._saver.metrics.pending
        if pending is not None and pending.step == step:
            pending.metrics.update(clean)
        else:
            step, epoch = self._check_step(step, epoch)
            self._saver.flush_metrics()
            self._last_step, self._last_epoch = step, epoch
            self._saver.metrics.hold(step, clean)
        if step == self._saver.last_saved_step:
            logger.info("Step %d of run %s is already saved", step, self.run_id)
            return False
        self._save(step, epoch, ("manual",), end_of_epoch=False)
        return True

    def wait(self) -> None:
        """Block until every pending save and metric is committed; raise a background error."""
        self._saver.wait()

    def close(self) -> None:
        """Save the last step if asked (``save_last``), wait for everything, stop the worker;
        in a distributed job (called on every rank) then destroy the manager's own groups."""
        if self._closed:
            return
        signalled = self._watch.received
        try:
            self._saver.wait_for_saves()  # a failing last save must be seen before...
            self._saver.raise_background_error()
            if (  # ...deciding whether the last step still needs saving
                (self.save_last or signalled is not None)
                and self._last_step is not None
                and self._last_step != self._saver.last_saved_step
            ):
                triggers = ("last",) if signalled is None else ("last", tags.PREEMPTED)
                self._save(self._last_step, self._last_epoch, triggers, end_of_epoch=False)
            self.wait()
            self._saver.final_retention()
            if self.client is not None and self.options.timeline:
                log_timeline(self.client, self.run_id)
        finally:
            try:
                self._shutdown()
            finally:  # every rank, however close went here: a rank that skipped it stalls
                if self._session.ranks is not None:  # the others at this barrier
                    self._session.ranks.close()
        if signalled is not None:  # the signal came after the last step: end as it would
            self._pass_signal_on(signalled)

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.wait()  # keep what was already saved; don't snapshot a failed state
        except CheckpointError:
            logger.exception("Pending checkpoint work failed while handling another error")
        finally:
            self._shutdown()

    # ------------------------------------------------------------------ read-only views

    @property
    def last_checkpoint(self) -> Checkpoint | None:
        """The newest checkpoint this manager committed (or resumed from)."""
        return self._saver.last_checkpoint

    @property
    def writer_id(self) -> str:
        """This process's writer-lease ID, also tagged on every checkpoint it writes ("" on
        the ranks other than 0 of a distributed job, which hold no lease)."""
        claim = self._session.claim
        return claim.lease.owner if claim is not None else ""

    @property
    def best_value(self) -> float | None:
        """Best value of ``monitor`` seen so far (across resumes), if monitoring."""
        return self._policies.best_value

    triggers: OptionView[tuple[Trigger, ...]] = OptionView()
    retention: OptionView[RetentionPolicy | None] = OptionView()
    format: OptionView[str] = OptionView()
    monitor: OptionView[str | None] = OptionView()
    async_save: OptionView[bool] = OptionView()
    save_last: OptionView[bool] = OptionView()
    log_metrics: OptionView[bool] = OptionView()
    on_error: OptionView[str] = OptionView()
    nonfinite: OptionView[str] = OptionView()
    verify: OptionView[str | Callable[[Any], Any]] = OptionView()

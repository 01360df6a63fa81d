"""``CheckpointManager``: one call in the training loop saves, logs and later resumes.

The manager decides *when* (policies) and owns the run (ownership, resume); its parts beside
it do the rest: options, step metrics, the saver (snapshot, then the one write path inline
or on the background worker), retention.
"""

from __future__ import annotations

import atexit
import inspect
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from mlflow import MlflowClient

from mlflow_ckpt.catalog import Checkpoint, tags
from mlflow_ckpt.codec import DEFAULT_MAX_SHARD_BYTES
from mlflow_ckpt.errors import CheckpointError
from mlflow_ckpt.manager.distributed_resume import restore_distributed
from mlflow_ckpt.manager.lease import DEFAULT_TTL_S
from mlflow_ckpt.manager.metrics import as_step, clean_metrics
from mlflow_ckpt.manager.options import (
    ManagerOptions,
    OptionView,
    build_options,
    check_state,
    option_arguments,
)
from mlflow_ckpt.manager.policies import StepPolicies
from mlflow_ckpt.manager.preemption import DEFAULT_GRACE_S, PreemptionWatch, signal_name
from mlflow_ckpt.manager.records import log_timeline, record_resume, record_start
from mlflow_ckpt.manager.resume import (
    ResumePoint,
    end_active_run,
    logged_since,
    reopen_run,
    restore_newest,
)
from mlflow_ckpt.manager.retention import RetentionPolicy
from mlflow_ckpt.manager.saver import Saver
from mlflow_ckpt.manager.session import Session, open_session
from mlflow_ckpt.manager.triggers import StepInfo, Trigger
from mlflow_ckpt.storage import TransferConfig

logger = logging.getLogger(__name__)


class CheckpointManager:
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
    code in each checkpoint), ``timeline`` (a picture logged at ``close()``). The README
    explains each; every argument is checked first."""

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
        if options.job is not None:
            self._open_newest(state, options, None, strict=True)
            return
        session = open_session(options, run_id, resume=False)
        try:
            self._setup(state, options, session)
        except BaseException:
            session.release()
            raise

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
        manager._open_newest(state, options, run_id, strict=strict)
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
        decision = self._policies.decide(info, self._watch.received)
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

    triggers = OptionView[tuple[Trigger, ...]]()
    retention = OptionView[RetentionPolicy | None]()
    format = OptionView[str]()
    monitor = OptionView[str | None]()
    async_save = OptionView[bool]()
    save_last = OptionView[bool]()
    log_metrics = OptionView[bool]()
    on_error = OptionView[str]()
    nonfinite = OptionView[str]()
    verify = OptionView[str | Callable[[Any], Any]]()

    # ------------------------------------------------------------------ internals

    def _open_newest(
        self,
        state: Mapping[str, Any],
        options: ManagerOptions,
        run_id: str | None,
        *,
        strict: bool,
    ) -> None:
        """Open the run (``run_id``, or the job's with ``resume="auto"``), restore its newest
        checkpoint that verifies, reopen it as the active run and carry on from there."""
        session = open_session(options, run_id, resume=True)
        try:
            if session.ranks is None:
                assert session.client is not None
                point = restore_newest(
                    session.client, session.run_id, session.experiment_id, state, strict=strict
                )
            else:
                point = restore_distributed(
                    session.client, session.run_id, state, session.ranks, strict=strict
                )
            if session.client is not None:
                reopen_run(session.run_id)
            self._setup(state, options, session)
        except BaseException:
            session.release()
            raise
        try:
            self._continue(point)
        except BaseException:
            self._shutdown()
            raise

    def _setup(self, state: Mapping[str, Any], options: ManagerOptions, session: Session) -> None:
        """Everything both constructors share, once the run is this process's to write."""
        self.state = state
        self.options = options
        self.client: MlflowClient | None = session.client  # None: a rank other than 0
        self.run_id: str = session.run_id
        self.experiment_id: str = session.experiment_id
        self._session = session
        self._policies = StepPolicies(options, session.ranks)
        self._saver = Saver(state, options, session)
        self.start_step = 0
        self.start_epoch = 0
        self.resumed_from: Checkpoint | None = None
        self._resumes = 0
        self._last_step: int | None = None
        self._last_epoch: int | None = None
        self._closed = False
        self._stopped = False
        self._watch = PreemptionWatch(options.signals, options.preempt_grace_s, self.run_id)
        self._watch.install()
        atexit.register(self._flush_at_exit)
        if session.client is not None and session.run is not None:
            record_start(
                session.client,
                session.run,
                options.monitor,
                options.mode,
                self._policies.params(),
            )

    def _continue(self, point: ResumePoint) -> None:
        """After a resume: carry on from the restored checkpoint (counters, triggers, metrics)."""
        if self._session.created:
            return  # resume="auto" started this job's run just now: nothing was resumed
        chosen = point.checkpoint
        if chosen is not None:
            self.resumed_from = chosen
            self._last_step = self._saver.resumed(point)
            self.start_step, self.start_epoch = point.start_step, point.start_epoch
            self._last_epoch = point.last_epoch
        self._policies.load_state_dict(point.manager_state)
        self._resumes = point.resumes
        if self.client is not None:
            self._saver.metrics.already_logged = logged_since(
                self.client, self.run_id, self.start_step
            )
            record_resume(self.client, self.run_id, self._resumes, chosen)
        logger.info(
            "Resumed run %s from %s; training continues at step %d",
            self.run_id,
            chosen.uri if chosen else "scratch",
            self.start_step,
        )

    def _check_usable(self) -> None:
        if self._closed:
            raise CheckpointError(f"CheckpointManager for run {self.run_id} is closed")
        claim = self._session.claim
        if claim is not None and claim.lease.lost_to is not None:
            claim.lease.check()  # another process owns the run now: stop before logging
        self._saver.raise_background_error()

    def _check_step(self, step: Any, epoch: Any) -> tuple[int, int | None]:
        step, epoch = as_step(step, epoch)
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(
                f"step {step} does not come after step {self._last_step} already recorded for "
                f"run {self.run_id}; steps are 0-based indices of finished steps and must "
                f"increase (after a resume, start at manager.start_step = {self.start_step})."
            )
        return step, epoch

    def _save(
        self,
        step: int,
        epoch: int | None,
        triggers: Iterable[str],
        *,
        end_of_epoch: bool,
        inline: bool = False,
    ) -> None:
        manager_state = {**self._policies.state_dict(), "resumes": self._resumes}
        cost = self._saver.save(
            step,
            epoch,
            triggers,
            end_of_epoch=end_of_epoch,
            manager_state=manager_state,
            inline=inline,
        )
        self._policies.saved(cost)

    def _save_preempted(
        self,
        step: int,
        epoch: int | None,
        triggers: tuple[str, ...],
        signum: int,
        end_of_epoch: bool,
    ) -> None:
        """A preemption signal came (here or on another rank): save this step synchronously
        after every save in flight, commit, then let the signal end the process."""
        self._watch.acknowledge(signum)
        started = time.monotonic()
        self._saver.wait()  # saves in flight commit first, in order
        if step != self._saver.last_saved_step:
            self._save(step, epoch, triggers, end_of_epoch=end_of_epoch, inline=True)
        self._saver.wait()
        logger.warning(
            "%s: saved step %d of run %s (trigger %s) in %.1fs",
            signal_name(signum),
            step,
            self.run_id,
            tags.PREEMPTED,
            time.monotonic() - started,
        )
        self._pass_signal_on(signum)

    def _pass_signal_on(self, signum: int) -> None:
        """Now that the step is committed, let ``signum`` do what it would have done: the
        handler installed before ours, or (none) release the run and end the process."""
        end_run = (lambda: end_active_run(self.run_id, "KILLED")) if self.client else _nothing
        self._watch.leave(signum, shutdown=self._shutdown, end_run=end_run)

    def _shutdown(self) -> None:
        self._closed = True
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self._flush_at_exit)
        self._watch.release()
        self._saver.stop()
        self._session.release()

    def _flush_at_exit(self) -> None:
        """At interpreter exit, commit pending saves and metrics (no new snapshot is taken)."""
        if self._closed:
            return
        try:
            self.wait()
        except Exception:
            logger.exception("Pending checkpoint work for run %s failed at exit", self.run_id)
        finally:
            self._shutdown()


def _nothing() -> None:
    """(No run to end: a rank other than 0.)"""

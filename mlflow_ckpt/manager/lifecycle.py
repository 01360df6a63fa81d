"""How a manager lives: opened on its run, carrying on from a resume, saving, ending.

:class:`~mlflow_ckpt.manager.manager.CheckpointManager` is the public face (its options,
the training-loop calls, the views); this base class is what those calls stand on: the
run opened (or the job's found) and taken up where its newest checkpoint left it, the
collaborators wired (policies, saver, preemption watch), each save handed to the saver, a
preemption signal turned into a committed checkpoint and then passed on, and the shutdown
that releases the run on every way out (close, an error, a signal, interpreter exit).
"""

from __future__ import annotations

import atexit
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from mlflow import MlflowClient

from mlflow_ckpt.catalog import Checkpoint, tags
from mlflow_ckpt.errors import CheckpointError, WriterConflictError
from mlflow_ckpt.manager.metrics import as_step
from mlflow_ckpt.manager.opening import open_run
from mlflow_ckpt.manager.options import ManagerOptions
from mlflow_ckpt.manager.policies import StepPolicies
from mlflow_ckpt.manager.preemption import PreemptionWatch, signal_name
from mlflow_ckpt.manager.records import record_resume, record_start
from mlflow_ckpt.manager.resume import ResumePoint, end_active_run, logged_since
from mlflow_ckpt.manager.saver import Saver
from mlflow_ckpt.manager.session import Session

logger = logging.getLogger(__name__)


class ManagerLifecycle:
    """The internals every :class:`CheckpointManager` runs on (see the module docstring).
    Every attribute is set by :meth:`_setup`, which both constructors reach through
    :meth:`_open`."""

    def _open(
        self,
        state: Mapping[str, Any],
        options: ManagerOptions,
        run_id: str | None,
        *,
        restore: bool,
        strict: bool,
    ) -> None:
        """Open the run (see :func:`~.opening.open_run`), then carry on from what it restored."""
        opened = open_run(state, options, run_id, restore=restore, strict=strict)
        try:
            self._setup(state, options, opened.session)
        except BaseException:
            opened.session.release()
            raise
        if opened.point is not None:
            try:
                self._continue(opened.point)
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
        self.start_step: int = 0
        self.start_epoch: int = 0
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
        if self._saver.conflict is not None:  # (every rank learned it at the same save)
            raise WriterConflictError(self._saver.conflict)
        lost = self._lost_lease() if self._session.ranks is None else None
        if lost is not None:  # another process owns the run now: stop before logging
            raise WriterConflictError(lost)
        self._saver.raise_background_error()

    def _lost_lease(self) -> str | None:
        """Why this process no longer owns the run (rank 0: its lease's heartbeat saw
        another owner), or ``None``. A distributed job hears it from rank 0 at the next
        step's decision (every rank stops together; one rank alone would leave the others
        waiting in the next collective)."""
        claim = self._session.claim
        if claim is None or claim.lease.lost_to is None:
            return None
        try:
            claim.lease.check()
        except WriterConflictError as exc:
            return str(exc)
        return None

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
            self._saver.wait()  # (what CheckpointManager.wait does)
        except Exception:
            logger.exception("Pending checkpoint work for run %s failed at exit", self.run_id)
        finally:
            self._shutdown()


def _nothing() -> None:
    """(No run to end: a rank other than 0.)"""

"""The MLflow run and the manager behind one framework training.

Lightning's callback, the Hugging Face callback and the plain-loop checkpointer all open a
manager the same way, through :class:`FrameworkRun`: resume the run a framework checkpoint
names (and refuse one that is not that run's newest good checkpoint), or start on the
active run (starting one, with an explicit name, when there is none); on close, end only
the run it started itself, as MLflow's own autolog does.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import Any

import mlflow

from mlflow_ckpt.errors import CheckpointError
from mlflow_ckpt.manager import CheckpointManager
from mlflow_ckpt.manager.preemption import signals_asked
from mlflow_ckpt.snapshot import preserved_python_rng

logger = logging.getLogger(__name__)


class FrameworkRun:
    """Opens, resumes and closes the manager of one training (one ``fit``/``train``/loop).

    ``resume_from`` says where a resumed run's framework checkpoint came from (e.g.
    ``"ckpt_path"``) and ``call`` how training is started (``"fit"``), for error messages.
    """

    def __init__(
        self, manager_kwargs: Mapping[str, Any], *, resume_from: str = "", call: str = ""
    ) -> None:
        self.manager_kwargs: dict[str, Any] = dict(manager_kwargs)
        self.resume_from = resume_from
        self.call = call
        self.manager: CheckpointManager | None = None
        self.run_id: str | None = None
        self._started_run = False

    @property
    def auto(self) -> bool:
        """Whether the job's own run is found by its key (``resume="auto"``)."""
        return self.manager_kwargs.get("resume") == "auto"

    def open(
        self,
        state: Mapping[str, Any],
        *,
        leader: bool = True,
        framework_step: int | None = 0,
        **overrides: Any,
    ) -> CheckpointManager:
        """A manager on the active run (started if there is none). ``leader=False``: a rank
        other than 0 of a distributed training, which needs no MLflow run of its own.
        With ``resume="auto"``: the job's own run, resumed where it stopped, which must be
        where the framework starts (``framework_step``; ``None``: nothing to compare, the
        caller starts its loop at the manager's ``start_step``)."""
        if self.auto:
            return self._open_job(state, None, framework_step, overrides)
        if leader:
            self.run_id, self._started_run = _start_run_if_needed()
        else:
            self.run_id, self._started_run = None, False
        kwargs = {**self.manager_kwargs, **overrides}
        self.manager = CheckpointManager(state, run_id=self.run_id, **kwargs)
        return self.manager

    def _open_job(
        self,
        state: Mapping[str, Any],
        run_id: str | None,
        framework_step: int | None,
        overrides: Mapping[str, Any],
    ) -> CheckpointManager:
        """``resume="auto"``: the manager opens (or resumes) the job's run; the framework must
        have resumed from the same checkpoint (``run_id``, ``framework_step``), or from none
        when the run has none."""
        self._started_run = mlflow.active_run() is None
        try:
            self.manager = CheckpointManager(state, **{**self.manager_kwargs, **overrides})
        except BaseException:
            self._started_run = False
            raise
        self.run_id = self.manager.run_id
        start = self.manager.start_step
        if run_id is not None and run_id != self.run_id:
            self.close()
            raise CheckpointError(
                f"The checkpoint given as {self.resume_from} belongs to MLflow run {run_id}, "
                f"but this job's run (resume='auto') is {self.run_id}. Resume from "
                "`mlflow_ckpt.resume_path('auto')`, or drop resume='auto' to continue the "
                "other run."
            )
        if framework_step is not None and start != framework_step:
            self.close()
            raise CheckpointError(
                f"This job's MLflow run {self.run_id} (resume='auto') continues at step "
                f"{start}, but the trainer starts at global step {framework_step}. Pass "
                f"`{self.resume_from}=mlflow_ckpt.resume_path('auto')` to {self.call} (it is "
                "None on a first start; mlflow_ckpt.autolog(resume='auto') passes it for you)."
            )
        return self.manager

    def resume(
        self,
        run_id: str,
        state: Mapping[str, Any],
        *,
        framework_step: int | None = None,
        **overrides: Any,
    ) -> CheckpointManager:
        """Continue ``run_id``; ``framework_step`` is where the framework itself resumes.

        The manager restores the newest checkpoint that verifies; a framework checkpoint from
        elsewhere (Lightning's own ``last.ckpt``, an older ``checkpoint-N``) would mix two
        states, so a ``framework_step`` that is not the manager's ``start_step`` is refused.
        """
        if self.auto:
            return self._open_job(state, run_id, framework_step, overrides)
        self.run_id = run_id
        self._started_run = mlflow.active_run() is None
        kwargs = {**self.manager_kwargs, **overrides}
        try:
            self.manager = CheckpointManager.resume(run_id, state, **kwargs)
        except CheckpointError as exc:
            self.close()
            if not self.resume_from:
                raise
            raise CheckpointError(
                f"Could not continue MLflow run {run_id} from the checkpoint given as "
                f"{self.resume_from}: {exc} If another run is active (MLflow's autologging "
                f"starts one), wrap {self.call} in `with mlflow.start_run(run_id={run_id!r}):`."
            ) from exc
        if framework_step is not None and self.manager.start_step != framework_step:
            start = self.manager.start_step
            self.close()
            raise CheckpointError(
                f"The checkpoint given to the trainer is at global step {framework_step}, but "
                f"the newest good checkpoint of MLflow run {run_id} continues at step {start}. "
                f"Resume from `mlflow_ckpt.resume_path({run_id!r})` so that both are the same."
            )
        return self.manager

    def close(self, *, failed: bool = False) -> None:
        """Close the manager (``failed``: keep what was saved, snapshot nothing more), then
        end the run if this object started it."""
        manager, self.manager = self.manager, None
        try:
            if manager is not None and failed:
                manager.__exit__(RuntimeError, RuntimeError("training failed"), None)
            elif manager is not None:
                manager.close()  # waits for uploads, saves the last step if not saved yet
        finally:
            self._end_run()

    def _end_run(self) -> None:
        started, self._started_run = self._started_run, False
        active = mlflow.active_run()
        if started and active is not None and active.info.run_id == self.run_id:
            with preserved_python_rng():
                mlflow.end_run()


def _start_run_if_needed() -> tuple[str, bool]:
    """The active run's ID, starting a run first if there is none; returns (run_id, started).

    The run gets an explicit name: MLflow invents names from Python's global ``random``, which
    would shift the training's random stream and break bit-for-bit resume.
    """
    active = mlflow.active_run()
    if active is not None:
        return active.info.run_id, False
    with preserved_python_rng():
        run = mlflow.start_run(run_name=f"mlflow-ckpt-{uuid.uuid4().hex[:8]}")
    logger.info("Started MLflow run %s for checkpoints", run.info.run_id)
    return run.info.run_id, True


def callback_kwargs(owner: str, manager_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A framework callback's manager keywords, checked and completed.

    The callback builds the state and finds the run itself, so ``state``/``run_id`` are
    refused; without any trigger it saves at the end of every epoch.
    """
    if "state" in manager_kwargs or "run_id" in manager_kwargs:
        raise TypeError(f"{owner} builds the state and finds the run itself")
    kwargs = dict(manager_kwargs)
    if not any(k.startswith("save_every_n_") or k in ("monitor", "triggers") for k in kwargs):
        kwargs["save_every_n_epochs"] = 1
    return kwargs


def runs_on_every_rank(manager_kwargs: Mapping[str, Any], world_size: int) -> bool:
    """Whether a callback runs a manager on every rank (distributed saves: sharded model
    and optimizer, each rank's own random streams) or on global rank 0 only.

    ``distributed=`` among the callback's keywords decides; by default every rank does
    when the framework trains on several processes of an initialized process group.
    """
    explicit = manager_kwargs.get("distributed")
    if explicit is not None:
        return bool(explicit)
    import torch.distributed as dist

    return world_size > 1 and dist.is_available() and dist.is_initialized()


def saves_within_epochs(manager_kwargs: Mapping[str, Any]) -> bool:
    """Whether a trigger may fire (or a spike show) mid-epoch, so every step must be recorded,
    not only epoch ends. A watched preemption signal is acted on at the next step too."""
    per_step = ("save_every_n_steps", "save_every_n_seconds", "triggers", "spike_factor")
    signals = signals_asked(manager_kwargs.get("save_on_signals"), manager_kwargs.get("resume"))
    return bool(signals) or any(manager_kwargs.get(k) for k in per_step)


class HoldsFrameworkRun:
    """Read access to a callback's :class:`FrameworkRun`: its manager and its MLflow run."""

    _run: FrameworkRun

    @property
    def manager(self) -> CheckpointManager | None:
        """The manager of the current training (``None`` outside one, or off the main rank)."""
        return self._run.manager

    @property
    def run_id(self) -> str | None:
        """The MLflow run the checkpoints go to."""
        return self._run.run_id

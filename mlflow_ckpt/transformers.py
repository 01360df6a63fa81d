"""Hugging Face Trainer integration: :class:`MlflowCheckpointCallback`, a ``TrainerCallback``.

Each checkpoint holds what the Trainer needs to resume (model, optimizer, LR scheduler, grad
scaler, the random streams and the ``TrainerState``), so
``trainer.train(resume_from_checkpoint=mlflow_ckpt.resume_path(run_id))`` continues the run
where it stopped, in the same MLflow run.

Importing this module imports ``transformers``; ``pip install 'mlflow-ckpt[transformers]'``
installs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from typing import Any

import mlflow

from mlflow_ckpt._integration_common import (
    HF_TRAINER_STATE_KEY,
    HeldState,
    check_resumed_step,
    end_run_if_started,
    numeric_metrics,
    require,
    start_run_if_needed,
)
from mlflow_ckpt.errors import CheckpointError
from mlflow_ckpt.manager import CheckpointManager

logger = logging.getLogger(__name__)

_transformers = require("transformers", "transformers")
TrainerCallback = _transformers.TrainerCallback

#: Our entry in ``TrainerState.stateful_callbacks``: which MLflow run a resume continues.
STATE_ENTRY = "MlflowCheckpointCallback"


def _mlflow_logs_metrics(args: Any, callbacks: list[Any]) -> bool:
    """Whether the Trainer's metrics already reach MLflow (its MLflowCallback or autolog).

    ``args.report_to`` tells even when we were not given the Trainer (so cannot see its
    callbacks); ``DagsHubCallback`` is an MLflowCallback too.
    """
    from mlflow.utils.autologging_utils import autologging_is_disabled

    if not autologging_is_disabled("transformers"):
        return True
    if {"mlflow", "dagshub"} & set(getattr(args, "report_to", None) or []):
        return True
    return any(c.__name__ == "MLflowCallback" for cb in callbacks for c in type(cb).__mro__)


class MlflowCheckpointCallback(TrainerCallback):  # type: ignore[misc, valid-type]
    """Save the Hugging Face Trainer's full training state as MLflow checkpoints.

    Keyword arguments are those of :class:`mlflow_ckpt.CheckpointManager`
    (``save_every_n_steps``, ``save_every_n_epochs``, ``monitor`` such as ``"eval_loss"``,
    ``mode``, ``keep_last_n``...). Without any trigger it saves at the end of every epoch.
    Steps are 0-based finished optimizer steps (``state.global_step - 1``). A step is recorded
    after the Trainer has logged and evaluated it, at the point where the Trainer itself would
    save, so evaluation metrics can trigger "best" saves and resume is exact.

    Pass ``trainer=`` (or call :meth:`attach`) so the grad scaler and other stateful callbacks
    are saved too; ``mlflow_ckpt.autolog()`` does that for you. ``log_metrics`` says whether
    metrics are logged to the run by this callback; by default only when neither the Trainer's
    ``MLflowCallback`` (``report_to="mlflow"``) nor ``mlflow.transformers.autolog()`` does.
    Only the main process (``state.is_world_process_zero``) writes.
    """

    def __init__(
        self, *, trainer: Any = None, log_metrics: bool | None = None, **manager_kwargs: Any
    ) -> None:
        if not any(k.startswith("save_every_n_") or k == "monitor" for k in manager_kwargs):
            manager_kwargs["save_every_n_epochs"] = 1
        if "state" in manager_kwargs or "run_id" in manager_kwargs:
            raise TypeError("MlflowCheckpointCallback builds the state and finds the run itself")
        self.manager_kwargs = manager_kwargs
        self.log_metrics = log_metrics
        self.trainer = trainer
        self.manager: CheckpointManager | None = None
        self.run_id: str | None = None
        self._started_run = False
        self._trainer_state: Any = None
        self._control: Any = None
        self._pending: tuple[int, int, bool] | None = None  # step, epoch, end_of_epoch
        self._metrics: dict[str, float] = {}

    def attach(self, trainer: Any) -> MlflowCheckpointCallback:
        """Let the callback see the Trainer (grad scaler, stateful callbacks)."""
        self.trainer = trainer
        return self

    # ------------------------------------------------------------------ hooks

    def on_train_begin(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: Any = None,
        optimizer: Any = None,
        lr_scheduler: Any = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero:
            return  # only the main process writes
        if self.manager is not None:  # a train() that failed before: don't orphan its manager
            with contextlib.suppress(Exception):
                self.manager.close()
            self.manager = None
        self._trainer_state, self._control = state, control
        self._pending, self._metrics = None, {}
        saved = (state.stateful_callbacks or {}).get(STATE_ENTRY) or {}
        resume_run = (saved.get("attributes") or {}).get("run_id") if state.global_step else None
        objects: dict[str, Any] = {
            "model": model,
            "optimizer": optimizer,
            "scheduler": lr_scheduler,
            HF_TRAINER_STATE_KEY: HeldState(lambda: {"json": self._state_json()}),
        }
        scaler = getattr(getattr(self.trainer, "accelerator", None), "scaler", None)
        if scaler is not None:
            objects["scaler"] = scaler
        objects = {k: v for k, v in objects.items() if v is not None}
        callbacks = list(getattr(getattr(self.trainer, "callback_handler", None), "callbacks", []))
        log_metrics = (
            not _mlflow_logs_metrics(args, callbacks)
            if self.log_metrics is None
            else self.log_metrics
        )
        manager_kwargs = dict(self.manager_kwargs, log_metrics=log_metrics)
        if resume_run:
            self.run_id = resume_run
            self._started_run = mlflow.active_run() is None
            try:
                self.manager = CheckpointManager.resume(resume_run, objects, **manager_kwargs)
            except CheckpointError as exc:
                raise CheckpointError(
                    f"Could not continue MLflow run {resume_run} from resume_from_checkpoint: "
                    f"{exc} If another run is active (report_to='mlflow' starts one), wrap "
                    f"train in `with mlflow.start_run(run_id={resume_run!r}):`."
                ) from exc
            try:
                check_resumed_step(self.manager, state.global_step, resume_run)
            except CheckpointError:
                self.manager = None
                end_run_if_started(resume_run, self._started_run)
                raise
        else:
            self.run_id, self._started_run = start_run_if_needed()
            self.manager = CheckpointManager(objects, run_id=self.run_id, **manager_kwargs)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._flush()

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._flush()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.manager is None:
            return
        self._flush()
        epoch = float(state.epoch or 0.0)
        end_of_epoch = epoch > 0 and math.isclose(epoch, round(epoch), abs_tol=1e-9)
        self._pending = (state.global_step - 1, max(math.ceil(epoch - 1e-9) - 1, 0), end_of_epoch)
        self._metrics = {}

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        if self._pending is not None:
            self._metrics.update(numeric_metrics(logs))

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        if self._pending is not None:
            self._metrics.update(numeric_metrics(metrics))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        manager, self.manager = self.manager, None
        if manager is None:
            return
        try:
            self._flush(manager)
            manager.close()  # waits for uploads, saves the last step if not saved yet
        finally:
            end_run_if_started(self.run_id, self._started_run)
            self._started_run = False

    # ------------------------------------------------------------------ internals

    def _flush(self, manager: CheckpointManager | None = None) -> None:
        """Record the finished step now that its logs and evaluation are in."""
        manager = manager or self.manager
        pending, self._pending = self._pending, None
        if manager is None or pending is None:
            return
        step, epoch, end_of_epoch = pending
        manager.step(step, metrics=self._metrics, epoch=epoch, end_of_epoch=end_of_epoch)
        self._metrics = {}

    def _state_json(self) -> str:
        """The ``TrainerState`` as the Trainer writes ``trainer_state.json``, plus our run."""
        state = self._trainer_state
        stateful = dict(state.stateful_callbacks or {})
        exportable = getattr(_transformers.trainer_callback, "ExportableState", None)
        sources = list(getattr(getattr(self.trainer, "callback_handler", None), "callbacks", []))
        if self._control is not None:
            sources.append(self._control)
        for cb in sources:
            if exportable is not None and isinstance(cb, exportable):
                stateful[type(cb).__name__] = cb.state()
        stateful[STATE_ENTRY] = {"args": {}, "attributes": {"run_id": self.run_id}}
        data = dataclasses.asdict(state)
        data["stateful_callbacks"] = stateful
        return json.dumps(data, indent=2, sort_keys=True)


__all__ = ["MlflowCheckpointCallback"]

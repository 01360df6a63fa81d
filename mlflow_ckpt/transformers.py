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
from pathlib import Path
from typing import Any

from mlflow_ckpt.integrations.framework_run import (
    FrameworkRun,
    HoldsFrameworkRun,
    callback_kwargs,
    runs_on_every_rank,
)
from mlflow_ckpt.integrations.framework_state import (
    HF_CALLBACK_ENTRY,
    HF_TRAINER_STATE_KEY,
    HeldState,
    numeric_metrics,
    require,
)
from mlflow_ckpt.integrations.loader_state import LoaderGenerators
from mlflow_ckpt.integrations.resume_folder import remove_temporary, temporary_root

logger = logging.getLogger(__name__)

_transformers = require("transformers", "transformers")
TrainerCallback = _transformers.TrainerCallback


def _mlflow_logs_metrics(args: Any, callbacks: list[Any]) -> bool:
    """Whether the Trainer's metrics already reach MLflow (its MLflowCallback or autolog).

    ``args.report_to`` tells even when we were not given the Trainer (so cannot see its
    callbacks); ``DagsHubCallback`` is an MLflowCallback too.
    """
    # (no public way to ask whether an autolog is on; unchanged in MLflow 3.0.0-3.17.2)
    from mlflow.utils.autologging_utils import autologging_is_disabled

    if not autologging_is_disabled("transformers"):
        return True
    if {"mlflow", "dagshub"} & set(getattr(args, "report_to", None) or []):
        return True
    return any(c.__name__ == "MLflowCallback" for cb in callbacks for c in type(cb).__mro__)


class MlflowCheckpointCallback(HoldsFrameworkRun, TrainerCallback):  # type: ignore[misc, valid-type]
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
    Under ``torchrun`` (several processes) it runs on every process and saves like a
    distributed :class:`~mlflow_ckpt.CheckpointManager`; ``distributed=False`` keeps it on
    the main process (``state.is_world_process_zero``) alone.
    """

    def __init__(
        self, *, trainer: Any = None, log_metrics: bool | None = None, **manager_kwargs: Any
    ) -> None:
        self.manager_kwargs: dict[str, Any] = callback_kwargs(
            "MlflowCheckpointCallback", manager_kwargs
        )
        self.log_metrics = log_metrics
        self.trainer: Any = trainer
        self._run = FrameworkRun(
            self.manager_kwargs, resume_from="resume_from_checkpoint", call="train"
        )
        self._trainer_state: Any = None
        self._control: Any = None
        self._pending: tuple[int, int, bool] | None = None  # step, epoch, end_of_epoch
        self._metrics: dict[str, float] = {}
        self._resume_folder: Path | None = None  # resume_path's temporary copy, to remove

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
        saved = (state.stateful_callbacks or {}).get(HF_CALLBACK_ENTRY) or {}
        attributes = (saved.get("attributes") or {}) if state.global_step else {}
        resume_run = attributes.get("run_id")
        # every process, writing or not, reads (then removes) the copy it resumed from
        self._resume_folder = temporary_root(attributes.get("resume_folder"))
        every = runs_on_every_rank(self.manager_kwargs, int(getattr(args, "world_size", 1)))
        if not (every or state.is_world_process_zero):
            return  # only the main process writes
        if self.manager is not None:  # a train() that failed before: don't orphan its manager
            with contextlib.suppress(Exception):
                self._run.close()
        self._trainer_state, self._control = state, control
        self._pending, self._metrics = None, {}
        loader = kwargs.get("train_dataloader")
        objects: dict[str, Any] = {
            "model": model,
            "optimizer": optimizer,
            "scheduler": lr_scheduler,
            HF_TRAINER_STATE_KEY: HeldState(lambda: {"json": self._state_json()}),
            # restored here, before the first resumed epoch makes its iterator
            "train_dataloader": LoaderGenerators(lambda: loader),
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
        if resume_run:
            self._run.resume(
                resume_run,
                objects,
                framework_step=state.global_step,
                log_metrics=log_metrics,
                distributed=every,
            )
        else:
            self._run.open(
                objects,
                leader=state.is_world_process_zero,
                log_metrics=log_metrics,
                distributed=every,
            )

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._flush()

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._flush()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._drop_resume_folder()  # a step has run: the Trainer has read all of it
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
        self._drop_resume_folder()
        if self.manager is None:
            return
        try:
            self._flush()
        finally:
            self._run.close()  # waits for uploads, saves the last step if not saved yet

    # ------------------------------------------------------------------ internals

    def _drop_resume_folder(self) -> None:
        """Remove the temporary folder ``resume_path`` wrote, once the Trainer has read it
        (model, optimizer and scheduler before training, the random streams' file inside
        the epoch loop, before the first step)."""
        folder, self._resume_folder = self._resume_folder, None
        if folder is not None:
            remove_temporary(folder)

    def _flush(self) -> None:
        """Record the finished step now that its logs and evaluation are in."""
        manager = self.manager
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
        stateful[HF_CALLBACK_ENTRY] = {"args": {}, "attributes": {"run_id": self.run_id}}
        data = dataclasses.asdict(state)
        data["stateful_callbacks"] = stateful
        return json.dumps(data, indent=2, sort_keys=True)


__all__ = ["MlflowCheckpointCallback"]

"""Checkpointing a plain PyTorch loop from its optimizer steps and its MLflow metrics."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch

from mlflow_ckpt.integrations.framework_run import FrameworkRun, HoldsFrameworkRun
from mlflow_ckpt.integrations.framework_state import numeric_metrics


class PlainLoopCheckpointer(HoldsFrameworkRun):
    """Checkpoints a plain PyTorch loop from its optimizer steps and its MLflow metrics.

    Made by ``mlflow_ckpt.autolog(model=..., optimizer=...)``. Optimizer step ``k``
    (0-based) is recorded with the manager once the loop has moved past it: when the monitored
    metric is logged with ``mlflow.log_metric(s)`` after it (the state, scheduler included, is
    then exactly "after step k", so a "best" checkpoint resumes exactly), or else when the next
    optimizer step begins, or on :meth:`close`. ``start_step`` is where a resumed loop goes on.
    Metrics the loop logs are never logged again; the values at saved steps are linked to
    their checkpoints.
    """

    def __init__(
        self,
        state: Mapping[str, Any],
        optimizers: list[torch.optim.Optimizer],
        *,
        resume: str | None,
        manager_kwargs: dict[str, Any],
    ) -> None:
        self.state: dict[str, Any] = dict(state)
        self.monitor: str | None = manager_kwargs.get("monitor")
        self._run = FrameworkRun(dict(manager_kwargs, log_metrics=False))
        self._steps_done = 0  # optimizer steps finished (counted on the first optimizer)
        self._pending: int | None = None  # finished step not yet given to the manager
        self._metrics: dict[str, float] = {}
        # Metrics the loop logs after a step get this timestamp, and so do their links to
        # the step's checkpoint: MLflow then keeps one history entry for both.
        self.timestamp_ms: int | None = None
        if resume is not None:
            self._steps_done = self._run.resume(resume, self.state).start_step
        elif self._run.auto:  # the job's own run, opened now: the loop starts where it stopped
            self._steps_done = self._run.open(self.state, framework_step=None).start_step
        self.start_step: int = self._steps_done
        first = optimizers[0]
        self._hooks = [
            first.register_step_pre_hook(self._before_step),
            first.register_step_post_hook(self._after_step),
        ]

    @property
    def waiting(self) -> bool:
        """Whether a finished step waits for its metrics (logged metrics then belong to it)."""
        return self._pending is not None

    # -------------------------------------------------- hooks

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._flush()

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._flush()
        self._pending = self._steps_done
        self._steps_done += 1
        self._metrics = {}
        self.timestamp_ms = int(time.time() * 1000)

    def observe(self, metrics: Mapping[str, Any]) -> None:
        """Called with what the loop logs through ``mlflow.log_metric(s)``."""
        if self._pending is None:
            return
        self._metrics.update(numeric_metrics(metrics))
        if self.monitor is not None and self.monitor in metrics:
            self._flush()

    def _flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        manager = self._run.manager or self._run.open(self.state)
        manager.step(pending, metrics=self._metrics, timestamp_ms=self.timestamp_ms)
        self._metrics = {}

    def close(self) -> None:
        """Record the last step, wait for uploads, save the last step, remove the hooks."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        try:
            self._flush()
        finally:
            self._run.close()

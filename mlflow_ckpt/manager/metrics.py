"""The metrics given to ``step()``: checked at the call, logged once per (metric, step).

A step's metrics are held until the next step arrives (or ``save``/``wait``/``close``), so
the metrics of a saved step can be linked to its LoggedModel in the commit's own request
instead of being logged twice. After a resume, (metric, step) pairs that reached MLflow
before the crash are not logged again.

Values are checked where the user passes them: a metric name MLflow would refuse, a value
that is not a number, a step that is not an integer all raise at the call, before any file
is written, instead of failing a background save minutes later.
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from mlflow import MlflowClient

# MLflow's own name rules: it has no public validator, and copying them would drift. The
# names are unchanged from MLflow 3.0.0 to 3.17.2 (.ci/compat runs both ends).
from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    bad_character_message,
    path_not_unique,
    validate_param_and_metric_name,
)

from mlflow_ckpt.catalog.metrics import log_step_metrics
from mlflow_ckpt.errors import CheckpointWriteError


def check_metric_name(name: Any, what: str = "metric name") -> str:
    """Refuse a name MLflow would refuse at commit time, with MLflow's own rules."""
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a string, got {name!r}")
    if len(name) > MAX_ENTITY_KEY_LENGTH:
        raise ValueError(
            f"{what} {name[:40]!r}... is {len(name)} characters; MLflow accepts at most "
            f"{MAX_ENTITY_KEY_LENGTH}"
        )
    if not name or not validate_param_and_metric_name(name) or path_not_unique(name):
        raise ValueError(f"{what} {name!r} is not accepted by MLflow. {bad_character_message()}")
    return name


def clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """Check names and turn values (Python, NumPy or one-element tensors) into floats."""
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        check_metric_name(key)
        if hasattr(value, "item") and callable(value.item):
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"metric {key!r} must be a number, not {type(value).__name__}")
        out[key] = float(value)
    return out


def as_step(step: Any, epoch: Any) -> tuple[int, int | None]:
    """``step``/``epoch`` as plain ints (NumPy and torch integers included), or ``ValueError``."""
    value = _integer(step)
    if value is None or value < 0:
        raise ValueError(f"step must be a non-negative int (0-based), got {step!r}")
    if epoch is None:
        return value, None
    number = _integer(epoch)
    if number is None:
        raise ValueError(f"epoch must be an int or None, got {epoch!r}")
    return value, number


def _integer(value: Any) -> int | None:
    """An integer given as ``int``, a NumPy integer or a one-element integer tensor."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class PendingMetrics:
    """The metrics of the newest step, not logged yet."""

    step: int
    metrics: dict[str, float]
    timestamp_ms: int


class StepMetrics:
    """Holds the newest step's metrics and makes the job that logs them (once).

    ``enabled=False`` when something else (the user, MLflow's autolog) logs the run's
    metrics: they then only drive triggers and are linked to saved checkpoints.
    """

    def __init__(self, client: MlflowClient, run_id: str, *, enabled: bool) -> None:
        self.client = client
        self.run_id = run_id
        self.enabled = enabled
        self.pending: PendingMetrics | None = None
        self.already_logged: set[tuple[str, int]] = set()

    def hold(self, step: int, metrics: dict[str, float], timestamp_ms: int | None = None) -> None:
        """Hold ``step``'s metrics (the previous step's must have been taken already)."""
        self.pending = PendingMetrics(
            step, metrics, now_ms() if timestamp_ms is None else timestamp_ms
        )

    def take_for(self, step: int) -> PendingMetrics | None:
        """Hand ``step``'s held metrics to its save (which links them to the checkpoint)."""
        pending = self.pending if self.pending and self.pending.step == step else None
        self.pending = None
        return pending

    def take_job(self) -> Callable[[], None] | None:
        """Release the held step: the job that logs what MLflow does not have yet, if any."""
        pending, self.pending = self.pending, None
        if pending is None or not self.enabled:
            return None
        metrics = {
            k: v for k, v in pending.metrics.items() if (k, pending.step) not in self.already_logged
        }
        if not metrics:
            return None

        def log() -> None:
            try:
                log_step_metrics(
                    self.client,
                    self.run_id,
                    metrics,
                    step=pending.step,
                    timestamp_ms=pending.timestamp_ms,
                )
            except Exception as exc:  # a tracking outage: on_error decides, like failed saves
                raise CheckpointWriteError(
                    f"Logging the metrics of step {pending.step} to run {self.run_id} in "
                    f"{self.client.tracking_uri} failed ({type(exc).__name__}: {exc}). "
                    "Checkpoints are not affected."
                ) from exc

        return log

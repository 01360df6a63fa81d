"""Logging one step's metrics to a run, optionally linked to the step's checkpoint.

Every metric the library logs goes through :func:`log_step_metrics`: the manager's steps, a
failed save's step and a commit's checkpoint link. One ``log_batch`` with ``model_id``
writes the run's history and the model's metric in one call (logging both separately would
duplicate the run's entries), so the Models tab compares checkpoints by the same values the
run's charts show.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

from mlflow import MlflowClient
from mlflow.entities import Metric

logger = logging.getLogger(__name__)


def metric_entities(
    metrics: Mapping[str, float], *, step: int, timestamp_ms: int, model_id: str | None = None
) -> list[Metric]:
    """MLflow ``Metric`` objects for one step, linked to a model when ``model_id`` is given.

    Non-finite values are logged to the run only: MLflow stores a model's NaN metric as 0.0
    (and inf as the largest float), which would make a diverged checkpoint look best.
    """
    return [
        Metric(
            key,
            float(value),
            timestamp_ms,
            step,
            model_id=model_id if math.isfinite(value) else None,
        )
        for key, value in metrics.items()
    ]


def log_step_metrics_quietly(
    client: MlflowClient,
    run_id: str,
    metrics: Mapping[str, float],
    *,
    step: int,
    timestamp_ms: int,
) -> None:
    """:func:`log_step_metrics` for records that must not fail a step (a warning instead)."""
    try:
        log_step_metrics(client, run_id, metrics, step=step, timestamp_ms=timestamp_ms)
    except Exception as exc:
        logger.warning(
            "Could not log %s at step %d to run %s: %s", dict(metrics), step, run_id, exc
        )


def log_step_metrics(
    client: MlflowClient,
    run_id: str,
    metrics: Mapping[str, float],
    *,
    step: int,
    timestamp_ms: int,
    model_id: str | None = None,
) -> None:
    """Log ``metrics`` at ``step`` to the run (and link them to ``model_id``), in one request."""
    if metrics:
        client.log_batch(
            run_id,
            metrics=metric_entities(
                metrics, step=step, timestamp_ms=timestamp_ms, model_id=model_id
            ),
        )

"""Creating and committing the LoggedModel that represents one checkpoint.

A checkpoint's LoggedModel is created PENDING with tags ``mlflow_ckpt.status=pending`` before
any byte is written, and becomes visible to queries only when ``commit`` tags it
``committed``, after its manifest is in the store. We create it with
``create_logged_model`` rather than ``mlflow.<flavor>.log_model(step=...)``: the latter copies
the run's whole metric history into each model, which costs seconds per checkpoint on long
runs. Every call passes an explicit name, because MLflow would otherwise draw one from
Python's global ``random`` and shift the user's random stream.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence

from mlflow import MlflowClient
from mlflow.entities import LoggedModel, LoggedModelOutput, Metric

from mlflow_ckpt.catalog import tags
from mlflow_ckpt.codec import FORMAT_VERSION

logger = logging.getLogger(__name__)


def create_pending(
    client: MlflowClient,
    *,
    experiment_id: str,
    run_id: str,
    step: int,
    epoch: int | None,
    triggers: Sequence[str],
    format: str,
    writer: str = "",
) -> LoggedModel:
    """Create the (still invisible) LoggedModel a save will write into.

    ``writer`` (the writer lease's ID) tells, after the fact, which process wrote it.
    """
    return client.create_logged_model(
        experiment_id=experiment_id,
        name=f"checkpoint-step-{step}",
        source_run_id=run_id,
        model_type=tags.MODEL_TYPE,
        tags={
            tags.STEP: str(step),
            tags.EPOCH: "" if epoch is None else str(epoch),
            tags.TRIGGER: ",".join(triggers),
            tags.FORMAT: format,
            tags.FORMAT_VERSION: str(FORMAT_VERSION),
            tags.STATUS: tags.PENDING,
            tags.WRITER: writer,
        },
    )


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


def commit(
    client: MlflowClient,
    model: LoggedModel,
    *,
    run_id: str,
    step: int,
    metrics: Mapping[str, float],
    timestamp_ms: int,
    size_bytes: int,
    manifest_sha256: str,
    link_run: bool = True,
) -> LoggedModel:
    """Make a fully written checkpoint visible: link metrics and run, then tag it committed.

    Logging the metrics with ``model_id`` writes the run's history and the model's metrics in
    one call (logging them separately would duplicate the run's entries). ``link_run=False``
    skips the run output link when it already exists (recovery of an interrupted commit).
    """
    if metrics:
        client.log_batch(
            run_id,
            metrics=metric_entities(
                metrics, step=step, timestamp_ms=timestamp_ms, model_id=model.model_id
            ),
        )
    if link_run:
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
    client.finalize_logged_model(model.model_id, "READY")
    # Last: the status tag is what makes queries list it, so nothing may fail after it.
    client.set_logged_model_tags(
        model.model_id,
        {
            tags.SIZE_BYTES: str(size_bytes),
            tags.MANIFEST_SHA256: manifest_sha256,
            tags.STATUS: tags.COMMITTED,
        },
    )
    return client.get_logged_model(model.model_id)


def mark_failed(client: MlflowClient, model_id: str) -> None:
    """Record a failed save (best effort: the store may be what failed)."""
    try:
        client.set_logged_model_tags(model_id, {tags.STATUS: tags.FAILED})
        client.finalize_logged_model(model_id, "FAILED")
    except Exception:
        logger.warning("Could not mark checkpoint %s as failed", model_id, exc_info=True)


def mark_corrupt(client: MlflowClient, model_id: str) -> None:
    """Tag a checkpoint that failed verification so later resumes skip it unread."""
    try:
        client.set_logged_model_tags(
            model_id, {tags.STATUS: tags.CORRUPT, f"{tags.PREFIX}corrupt_at": str(time.time())}
        )
    except Exception:
        logger.warning("Could not tag checkpoint %s as corrupt", model_id, exc_info=True)

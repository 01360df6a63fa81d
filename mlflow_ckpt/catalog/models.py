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
import time
from collections.abc import Mapping, Sequence

from mlflow import MlflowClient
from mlflow.entities import LoggedModel, LoggedModelOutput

from mlflow_ckpt.catalog import tags
from mlflow_ckpt.catalog.metrics import log_step_metrics
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
    validated: bool = False,
    name: str | None = None,
    extra_tags: Mapping[str, str] | None = None,
    extra_params: Mapping[str, str] | None = None,
) -> LoggedModel:
    """Create the (still invisible) LoggedModel a save will write into.

    ``writer`` (the writer lease's ID) tells, after the fact, which process wrote it.
    ``validated`` marks a save whose commit waits for the user's validation. Step,
    epoch, trigger and format are tags (what queries filter on) and also params: the MLflow
    UI's Models tab shows params as columns, so checkpoints sort and compare by step there.
    ``name`` defaults to the training checkpoint's name (:func:`tags.model_name`); a
    checkpoint made after training (an average) passes its own, so run-scoped queries
    leave it out, and records where it came from in ``extra_tags``/``extra_params``.
    """
    described = {
        "step": str(step),
        "epoch": "" if epoch is None else str(epoch),
        "trigger": ",".join(triggers),
        "format": format,
        **(extra_params or {}),
    }
    return client.create_logged_model(
        experiment_id=experiment_id,
        name=name or tags.model_name(step),
        source_run_id=run_id,
        model_type=tags.MODEL_TYPE,
        params=described,
        tags={
            **(extra_tags or {}),
            tags.STEP: described["step"],
            tags.EPOCH: described["epoch"],
            tags.TRIGGER: described["trigger"],
            tags.FORMAT: format,
            tags.FORMAT_VERSION: str(FORMAT_VERSION),
            tags.STATUS: tags.PENDING,
            tags.WRITER: writer,
            **({tags.VALIDATION: "pending"} if validated else {}),
        },
    )


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
    stored_bytes: int | None = None,
    shared_groups: Sequence[str] = (),
) -> LoggedModel:
    """Make a fully written checkpoint visible: link metrics and run, then tag it committed.

    Logging the metrics with ``model_id`` writes the run's history and the model's metrics in
    one call (logging them separately would duplicate the run's entries). ``link_run=False``
    skips the run output link when it already exists (recovery of an interrupted commit).
    """
    log_step_metrics(
        client, run_id, metrics, step=step, timestamp_ms=timestamp_ms, model_id=model.model_id
    )
    if link_run:
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
    client.finalize_logged_model(model.model_id, "READY")
    # Last: the status tag is what makes queries list it, so nothing may fail after it.
    client.set_logged_model_tags(
        model.model_id,
        {
            tags.SIZE_BYTES: str(size_bytes),
            tags.STORED_BYTES: str(size_bytes if stored_bytes is None else stored_bytes),
            tags.MANIFEST_SHA256: manifest_sha256,
            **({tags.SHARED: ",".join(shared_groups)} if shared_groups else {}),
            **({tags.VALIDATION: "passed"} if tags.VALIDATION in model.tags else {}),
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


def mark_invalid(client: MlflowClient, model_id: str, reason: str) -> None:
    """Tag a checkpoint that failed verification after its save: never listed or resumed."""
    try:
        client.set_logged_model_tags(
            model_id, {tags.STATUS: tags.INVALID, tags.INVALID_REASON: reason[:5000]}
        )
        client.finalize_logged_model(model_id, "FAILED")
    except Exception:
        logger.warning("Could not tag checkpoint %s as invalid", model_id, exc_info=True)


def set_pinned(client: MlflowClient, model_id: str, reason: str | None) -> None:
    """Pin a checkpoint (retention never deletes it) with ``reason``, or unpin it (``None``)."""
    if reason is None:
        client.delete_logged_model_tag(model_id, tags.PINNED)
    else:
        client.set_logged_model_tags(model_id, {tags.PINNED: reason})

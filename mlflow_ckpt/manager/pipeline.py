"""The one write path every save takes: snapshot -> encode -> store -> commit.

Sync saves call :func:`write_checkpoint` on the training thread, async saves on the
background worker; the steps and their failure handling are identical. Any failure leaves
the LoggedModel uncommitted (so it is never listed or resumed from), removes what was
written, and raises :class:`CheckpointWriteError` naming the run, step and location.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import time
from dataclasses import dataclass

from mlflow import MlflowClient

from mlflow_ckpt import flavor
from mlflow_ckpt.catalog import models
from mlflow_ckpt.catalog.checkpoint import Checkpoint
from mlflow_ckpt.errors import CheckpointWriteError
from mlflow_ckpt.snapshot import Snapshot
from mlflow_ckpt.storage import TransferConfig, open_store, redact

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WriteTarget:
    """Where and how checkpoints of one manager are written."""

    client: MlflowClient
    run_id: str
    experiment_id: str
    spec: flavor.FolderSpec
    transfer: TransferConfig | None = None


@dataclass
class SaveJob:
    """One pending save: the snapshot and what to record with it."""

    snapshot: Snapshot
    step: int
    epoch: int | None
    metrics: dict[str, float]
    triggers: tuple[str, ...]
    timestamp_ms: int


def write_checkpoint(target: WriteTarget, job: SaveJob) -> Checkpoint:
    """Write one checkpoint and commit it; return its record."""
    client = target.client
    started = time.perf_counter()
    try:
        model = models.create_pending(
            client,
            experiment_id=target.experiment_id,
            run_id=target.run_id,
            step=job.step,
            epoch=job.epoch,
            triggers=job.triggers,
            format=target.spec.format,
        )
    except Exception as exc:
        raise CheckpointWriteError(
            f"Could not create the LoggedModel for step {job.step} of run {target.run_id} in "
            f"{client.tracking_uri}: {exc}. Previous checkpoints are intact."
        ) from exc
    location = model.artifact_location
    store = open_store(location, target.transfer)
    try:
        manifest = flavor.write_folder(
            store,
            job.snapshot,
            target.spec,
            model_id=model.model_id,
            run_id=target.run_id,
            step=job.step,
            epoch=job.epoch,
            metrics=job.metrics,
            triggers=job.triggers,
            created_at=job.timestamp_ms / 1000,
        )
        committed = models.commit(
            client,
            model,
            run_id=target.run_id,
            step=job.step,
            metrics=job.metrics,
            timestamp_ms=job.timestamp_ms,
            size_bytes=manifest.size_bytes,
        )
    except BaseException as exc:
        models.mark_failed(client, model.model_id)
        with contextlib.suppress(Exception):
            store.close()  # let in-flight uploads finish so nothing lands after the cleanup
        try:
            store.delete_all()
        except Exception:
            logger.warning("Could not remove the partial checkpoint at %s", redact(location))
        reason = (
            "no space left on device"
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC
            else f"{type(exc).__name__}: {exc}"
        )
        raise CheckpointWriteError(
            f"Saving step {job.step} of run {target.run_id} to {redact(location)} failed "
            f"({reason}). "
            "The new checkpoint is not committed and will never be listed or resumed from; "
            "earlier checkpoints are intact. Fix the cause (space, permissions, network) and "
            "save again."
        ) from exc
    store.close()
    logger.info(
        "Committed checkpoint %s (run %s, step %d, %.1f MB) in %.2fs",
        model.model_id,
        target.run_id,
        job.step,
        manifest.size_bytes / 1e6,
        time.perf_counter() - started,
    )
    return Checkpoint.from_logged_model(committed)

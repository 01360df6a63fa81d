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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mlflow import MlflowClient
from mlflow.entities import LoggedModel

from mlflow_ckpt.catalog import models
from mlflow_ckpt.catalog.checkpoint import Checkpoint
from mlflow_ckpt.catalog.deletion import discard_failed
from mlflow_ckpt.catalog.metrics import log_step_metrics_quietly
from mlflow_ckpt.catalog.shared import delete_groups
from mlflow_ckpt.codec import Manifest
from mlflow_ckpt.errors import (
    CheckpointVerificationError,
    CheckpointWriteError,
    WriterConflictError,
)
from mlflow_ckpt.folder import FolderSpec, write_folder
from mlflow_ckpt.folder.incremental import Base

if TYPE_CHECKING:
    from mlflow_ckpt.codec.dcp_metadata import ChunkBase
from mlflow_ckpt.manager.verification import VerificationFailed, Verify, verify_stored
from mlflow_ckpt.snapshot import Snapshot
from mlflow_ckpt.snapshot.sharded import ShardedSnapshot
from mlflow_ckpt.storage import Store, TransferConfig, open_store, redact
from mlflow_ckpt.storage.routed import RoutedStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WriteTarget:
    """Where and how checkpoints of one manager are written."""

    client: MlflowClient  # on ranks other than 0 of a distributed job: None (no MLflow)
    run_id: str
    experiment_id: str
    spec: FolderSpec
    transfer: TransferConfig | None = None
    # Raises WriterConflictError when another process has taken the run over.
    check_writer: Callable[[], None] | None = None
    writer_id: str = ""
    log_metrics: bool = True  # False: something else (MLflow's autolog) logs the run's metrics
    verify: Verify = "size"  # what is checked after the manifest is stored, before the commit
    shared_uri: str | None = None  # incremental saves: the run's shared area


@dataclass
class SaveJob:
    """One pending save: the snapshot and what to record with it."""

    snapshot: Snapshot
    step: int
    epoch: int | None
    metrics: dict[str, float]
    triggers: tuple[str, ...]
    timestamp_ms: int
    previous_step: int | None = None  # the newest committed step, named in failure messages
    # Distributed saves: this rank's modules/optimizers through DCP (the snapshot then
    # holds only the rest of this rank's state), and the progress rank 0 records.
    sharded: ShardedSnapshot | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    base: Base | None = None  # incremental saves: the checkpoint whose shared bytes it reuses
    chunk_base: ChunkBase | None = None  # the same for this rank's chunks (distributed)
    # A milestone of an incremental run: written whole into its own folder, no shared file.
    self_contained: bool = False


def _intact(job: SaveJob) -> str:
    if job.previous_step is None:
        return "no earlier checkpoint was affected"
    return f"the checkpoint of step {job.previous_step} is still intact"


def reason(exc: BaseException) -> str:
    cause: BaseException | None = exc
    for _ in range(8):  # ENOSPC may arrive wrapped by a writer thread or the store
        if cause is None:
            break
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            return f"no space left on device: {cause.filename or cause}"
        cause = cause.__cause__ or cause.__context__
    return f"{type(exc).__name__}: {exc}"


def create_model(target: WriteTarget, job: SaveJob) -> LoggedModel:
    """The pending LoggedModel a save of ``job`` writes into."""
    return models.create_pending(
        target.client,
        experiment_id=target.experiment_id,
        run_id=target.run_id,
        step=job.step,
        epoch=job.epoch,
        triggers=job.triggers,
        format=target.spec.format,
        writer=target.writer_id,
        validated=callable(target.verify),
    )


def commit_model(
    target: WriteTarget,
    job: SaveJob,
    model: LoggedModel,
    manifest: Manifest,
    score: Mapping[str, float],
) -> LoggedModel:
    """Make the stored checkpoint of ``job`` visible, its metrics (and score) linked."""
    return models.commit(
        target.client,
        model,
        run_id=target.run_id,
        step=job.step,
        metrics={**job.metrics, **score},
        timestamp_ms=job.timestamp_ms,
        size_bytes=manifest.size_bytes,
        stored_bytes=manifest.stored_bytes,
        shared_groups=manifest.shared_groups,
        manifest_sha256=manifest.digest(),
    )


def write_checkpoint(target: WriteTarget, job: SaveJob) -> tuple[Checkpoint, Manifest]:
    """Write one checkpoint and commit it; return its record and manifest."""
    client = target.client
    started = time.perf_counter()
    try:
        model = create_model(target, job)
    except Exception as exc:
        log_unsaved_metrics(target, job)
        raise CheckpointWriteError(
            f"Could not create the LoggedModel for step {job.step} of run {target.run_id} in "
            f"{client.tracking_uri}: {exc}. {_intact(job).capitalize()}."
        ) from exc
    location = model.artifact_location
    store = open_store(location, target.transfer)
    if target.shared_uri is not None and not job.self_contained:
        # incremental: lasting bytes go to the shared area (a milestone keeps them all)
        store = RoutedStore(store, open_store(target.shared_uri, target.transfer))
    where = f"{model.model_id} (run {target.run_id}, step {job.step})"
    try:
        if target.check_writer is not None:
            target.check_writer()
        manifest = write_folder(
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
            before_manifest=target.check_writer,
            base=job.base,
        )
        score = verify_stored(store, manifest, target.verify, where)
    except VerificationFailed as exc:
        models.mark_invalid(client, model.model_id, str(exc))
        log_unsaved_metrics(target, job)
        with contextlib.suppress(Exception):
            store.close()
        raise CheckpointVerificationError(
            f"Step {job.step} of run {target.run_id} was written to {redact(location)} but "
            f"failed verification after the save ({exc}). It is tagged invalid and will never "
            f"be listed or resumed from (`mlflow-ckpt gc` removes it); {_intact(job)}."
        ) from exc
    except BaseException as exc:
        _discard(target, model, store)
        if isinstance(exc, WriterConflictError):
            raise
        log_unsaved_metrics(target, job)
        raise CheckpointWriteError(
            f"Saving step {job.step} of run {target.run_id} to {redact(location)} failed "
            f"({reason(exc)}). The new checkpoint is not committed and will never be listed "
            f"or resumed from; {_intact(job)}. Fix the cause (space, permissions, network) "
            "and save again."
        ) from exc
    # The manifest is in the store: the checkpoint is complete. If this process lost the run
    # meanwhile, leave it alone: the new owner's recovery adopted it or finalized it. If the
    # commit fails, recovery adopts it later (its metrics included).
    try:
        if target.check_writer is not None:
            target.check_writer()
        committed = commit_model(target, job, model, manifest, score)
    except WriterConflictError:
        raise
    except Exception as exc:
        raise CheckpointWriteError(
            f"Step {job.step} of run {target.run_id} is stored at {redact(location)} but "
            f"could not be committed in {client.tracking_uri} ({reason(exc)}). The next "
            "resume or `mlflow-ckpt gc` adopts it once the tracking server is reachable."
        ) from exc
    finally:
        with contextlib.suppress(Exception):
            store.close()
    logger.info(
        "Committed checkpoint %s (run %s, step %d, %.1f MB) in %.2fs",
        model.model_id,
        target.run_id,
        job.step,
        manifest.size_bytes / 1e6,
        time.perf_counter() - started,
    )
    return Checkpoint.from_logged_model(committed), manifest


def log_unsaved_metrics(
    target: WriteTarget, job: SaveJob, marks: Mapping[str, float] | None = None
) -> None:
    """A step that was not saved still belongs in the run's history: log its metrics (best
    effort, not linked to any checkpoint), with ``marks`` (always logged) in the same call."""
    metrics = {**(job.metrics if target.log_metrics else {}), **(marks or {})}
    if metrics and target.client is not None:  # None: a rank other than 0
        log_step_metrics_quietly(
            target.client, target.run_id, metrics, step=job.step, timestamp_ms=job.timestamp_ms
        )


def _discard(target: WriteTarget, model: LoggedModel, store: Store) -> None:
    """Remove a failed save: its partial files, then its LoggedModel (best effort).

    The store is closed first so that no in-flight upload lands after the cleanup. What
    cannot be removed now stays tagged failed for ``mlflow-ckpt gc``.
    """
    with contextlib.suppress(Exception):
        store.close()
    if discard_failed(target.client, model, store) and target.shared_uri is not None:
        delete_groups(target.shared_uri, [model.model_id], target.transfer)  # never referenced

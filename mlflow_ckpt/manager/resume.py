"""Continuing a run: restore the newest verified checkpoint, then reopen the MLflow run.

The order is what makes ``CheckpointManager.resume`` safe. Arguments are checked and the run
taken over (lease, recovery) first; restoring is all-or-nothing and comes before any write
to the run, so a checkpoint that does not fit leaves both the objects and the run untouched;
only then is the run reopened and the resume recorded on it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow import MlflowClient

from mlflow_ckpt.catalog import Checkpoint, VerifiedCheckpoint, describe, newest_verified
from mlflow_ckpt.catalog.recovery import logged_pairs
from mlflow_ckpt.codec import Manifest
from mlflow_ckpt.errors import CheckpointError
from mlflow_ckpt.snapshot import preserved_python_rng, restore
from mlflow_ckpt.snapshot.changes import Seen
from mlflow_ckpt.snapshot.snapshot import frozen_holding

if TYPE_CHECKING:  # (DCP is imported only by distributed saves)
    from mlflow_ckpt.codec.dcp_metadata import ChunkBase

logger = logging.getLogger(__name__)


def check_no_other_run(run_id: str) -> None:
    """Refuse to resume ``run_id`` while another run is active in this process."""
    active = mlflow.active_run()
    if active is not None and active.info.run_id != run_id:
        raise CheckpointError(
            f"Cannot resume run {run_id}: run {active.info.run_id} is active in this "
            "process. End it first (mlflow.end_run())."
        )


def restore_newest(
    client: MlflowClient,
    run_id: str,
    experiment_id: str,
    state: Mapping[str, Any],
    *,
    strict: bool,
) -> ResumePoint:
    """Restore the newest checkpoint of ``run_id`` that verifies into ``state`` (and the
    global random streams); an empty point (and nothing changed) when the run has none.

    A forked run without a checkpoint of its own restores the one it was forked from; its
    point then carries no incremental base, so nothing the fork saves refers to the
    source's bytes (the source's retention and ``mlflow gc`` cannot break it)."""
    verified = newest_verified(run_id, client, experiment_id, state)
    if verified is None:
        return ResumePoint()
    decoded = verified.loaded.decoded
    restore(decoded, state, strict=strict, restore_rng_streams=True, where=describe(verified.model))
    if verified.checkpoint.run_id != run_id:  # a fork's source: the first save is whole
        return ResumePoint.of_progress(verified.checkpoint, decoded.progress)
    return ResumePoint.of(verified, frozen_holding(state, decoded.tensors))


def reopen_run(run_id: str) -> None:
    """Make ``run_id`` the active run (it may be already)."""
    with preserved_python_rng():  # the user's random streams are restored: keep them
        if mlflow.active_run() is None:
            mlflow.start_run(run_id=run_id)


def end_active_run(run_id: str, status: str) -> None:
    """End ``run_id`` with ``status`` if it is the active run (never raises: the process is
    about to end, and a run left RUNNING is only cosmetic)."""
    active = mlflow.active_run()
    if active is None or active.info.run_id != run_id:
        return
    try:
        with preserved_python_rng():
            mlflow.end_run(status=status)
    except Exception as exc:
        logger.warning("Could not mark run %s %s: %s", run_id, status, exc)


def logged_since(client: MlflowClient, run_id: str, start_step: int) -> set[tuple[str, int]]:
    """The (metric, step) pairs already in the run's history from ``start_step`` on."""
    return {(key, step) for key, step in logged_pairs(client, run_id) if step >= start_step}


@dataclass(frozen=True)
class ResumePoint:
    """Where training continues, read from the restored checkpoint's saved progress."""

    checkpoint: Checkpoint | None = None
    start_step: int = 0
    start_epoch: int = 0
    last_epoch: int | None = None
    manager_state: dict[str, Any] = field(default_factory=dict)  # triggers, spike watch
    resumes: int = 1  # this resume included
    manifest: Manifest | None = None  # the restored checkpoint's (what the next save references)
    frozen: Mapping[str, Seen] = field(default_factory=dict)  # frozen parameters holding its bytes
    chunk_base: ChunkBase | None = None  # distributed: where its chunks lie (tensor, offsets)

    @classmethod
    def of(cls, verified: VerifiedCheckpoint, frozen: Mapping[str, Seen]) -> ResumePoint:
        """From a checkpoint restored here, and the frozen parameters holding its bytes."""
        point = cls.of_progress(verified.checkpoint, verified.loaded.decoded.progress)
        return dataclasses.replace(point, manifest=verified.loaded.manifest, frozen=frozen)

    @classmethod
    def of_progress(cls, checkpoint: Checkpoint, progress: Mapping[str, Any]) -> ResumePoint:
        """From a restored checkpoint and the progress record saved in it."""
        manager_state = progress.get("manager") or {}
        epoch = progress.get("epoch")
        return cls(
            checkpoint=checkpoint,
            start_step=checkpoint.step + 1,
            start_epoch=0 if epoch is None else int(epoch) + bool(progress.get("end_of_epoch")),
            last_epoch=None if epoch is None else int(epoch),
            manager_state=dict(manager_state),
            resumes=int(manager_state.get("resumes", 0)) + 1,
        )

"""The write path of a save taken by several ranks: every rank writes, rank 0 commits.

1. Rank 0 creates the pending LoggedModel; every rank learns its folder.
2. Every rank writes its own state under ``ranks/<rank>/`` and its shards through DCP
   (``dcp.save`` on our commit group plans who writes which replicated tensor).
3. Every rank reports its files (sizes, hashes) or its error to every rank.
4. Rank 0 writes ``state.json``, ``MLmodel`` and the manifest, verifies and commits, or, if
   any rank failed, discards the folder; every rank learns the outcome.

So the save is atomic across ranks: one manifest, written only when every rank's files are
in the store, and every rank's ``step()``/``save()``/``close()`` raises (or warns) about a
failure on any rank, naming it. A rank killed mid-save leaves the others to time out in
step 3 (the group's timeout); its partial files are cleaned by the next resume or gc.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from datetime import datetime
from typing import TYPE_CHECKING, Any

from mlflow_ckpt.catalog import models
from mlflow_ckpt.catalog.checkpoint import Checkpoint
from mlflow_ckpt.catalog.deletion import discard_failed
from mlflow_ckpt.catalog.shared import delete_groups
from mlflow_ckpt.codec.manifest import SHARED_PREFIX
from mlflow_ckpt.errors import (
    CheckpointVerificationError,
    CheckpointWriteError,
    WriterConflictError,
)
from mlflow_ckpt.folder.distributed import RankFiles, write_rank_files, write_root
from mlflow_ckpt.manager.pipeline import (
    SaveJob,
    WriteTarget,
    commit_model,
    create_model,
    log_unsaved_metrics,
    reason,
)
from mlflow_ckpt.manager.ranks import RankError, RankGroup
from mlflow_ckpt.manager.verification import VerificationFailed, verify_stored
from mlflow_ckpt.snapshot import Snapshot, first_nonfinite
from mlflow_ckpt.storage import open_store, redact
from mlflow_ckpt.storage.routed import RoutedStore

if TYPE_CHECKING:
    from mlflow_ckpt.codec.dcp_metadata import ChunkBase

logger = logging.getLogger(__name__)


def checkpoint_to_json(ckpt: Checkpoint) -> dict[str, Any]:
    data = dataclasses.asdict(ckpt)
    data["created_at"] = ckpt.created_at.isoformat()
    return data


def checkpoint_from_json(data: dict[str, Any]) -> Checkpoint:
    data = dict(data)
    data["created_at"] = datetime.fromisoformat(data["created_at"])
    data["triggers"] = tuple(data.get("triggers") or ())
    data["shared"] = tuple(data.get("shared") or ())  # JSON made the tuples lists
    return Checkpoint(**data)


def first_nonfinite_everywhere(job: SaveJob, ranks: RankGroup) -> str | None:
    """The first NaN/inf tensor on any rank (its name and rank), the same on every rank."""
    from torch.distributed.tensor import DTensor

    assert job.sharded is not None
    local = {
        k: t.to_local() if isinstance(t, DTensor) else t for k, t in job.sharded.tensors.items()
    }
    found = first_nonfinite(Snapshot({}, local)) or first_nonfinite(job.snapshot)
    reports = ranks.all_gather(found, group=ranks.commit, what=f"step {job.step}: NaN/inf check")
    return next((f"{name} (rank {r})" for r, name in enumerate(reports) if name), None)


def write_distributed(
    target: WriteTarget, job: SaveJob, ranks: RankGroup
) -> tuple[Checkpoint, ChunkBase | None]:
    """Run this rank's part of one distributed save; return the committed checkpoint and,
    for incremental saves, where this rank's chunks now lie (the next save's base)."""
    group = ranks.commit
    what = f"saving step {job.step} of run {target.run_id}"
    created: dict[str, Any] = {}
    model = None
    if ranks.is_leader:
        try:
            model = create_model(target, job)
            created = {
                "model_id": model.model_id,
                "location": model.artifact_location,
                # rank 0 knows the run: every rank needs it (none for a milestone)
                "shared_uri": None if job.self_contained else target.shared_uri,
            }
        except Exception as exc:
            log_unsaved_metrics(target, job)
            created = {"error": f"could not create its LoggedModel: {reason(exc)}"}
    created = ranks.broadcast(created, group=group, what=what)
    if "error" in created:
        raise CheckpointWriteError(f"{what.capitalize()} failed on rank 0: {created['error']}")
    location, shared_uri = created["location"], created.get("shared_uri")
    error: BaseException | None = None
    own = RankFiles((), ())
    store: Any = None
    writer: Any = None
    try:  # every failure below is reported, never raised early: the others would wait
        store = open_store(location, target.transfer)
        if shared_uri is not None:  # incremental: unchanged chunks in the run's shared area
            store = RoutedStore(store, open_store(shared_uri, target.transfer))
        own = write_rank_files(store, ranks.rank, job.snapshot, target.spec)
    except BaseException as exc:
        error = exc
    try:
        # collective: taken part in even after a failure
        shared_dir = f"{SHARED_PREFIX}{created['model_id']}" if shared_uri else None
        writer = _save_shards(store, job, ranks, target, shared_dir)
        shards, raw = (list(writer.files), writer.raw_bytes) if writer else ([], 0)
        if store is not None:
            store.flush()
        own = RankFiles((*own.files, *shards), own.tensors, raw)
    except BaseException as exc:
        error = error or exc
    report = {"error": None if error is None else reason(error), "files": own.to_json()}
    try:
        reports = ranks.all_gather(report, group=group, what=what)
    except RankError:
        with contextlib.suppress(Exception):
            store.close()  # None: nothing to close
        raise
    failed = {r: rep["error"] for r, rep in enumerate(reports) if rep["error"]}
    outcome: dict[str, Any] = {}
    if ranks.is_leader:
        assert model is not None
        outcome = _commit_or_discard(
            target, job, model, store, reports, failed, location, shared_uri
        )
    outcome = ranks.broadcast(outcome, group=group, what=what)
    with contextlib.suppress(Exception):
        store.close()
    if "checkpoint" in outcome:
        base = writer.written if writer is not None and shared_uri is not None else None
        return checkpoint_from_json(outcome["checkpoint"]), base
    kind = CheckpointVerificationError if outcome.get("invalid") else CheckpointWriteError
    raise kind(outcome["error"]) from error


def _save_shards(
    store: Any, job: SaveJob, ranks: RankGroup, target: WriteTarget, shared_dir: str | None
) -> Any:
    import torch.distributed.checkpoint as dcp

    from mlflow_ckpt.codec.dcp_store import StoreWriter

    assert job.sharded is not None
    spec = target.spec
    changes = job.sharded.changes
    writer = StoreWriter(
        store,
        spec.compression,
        spec.compression_level,
        shared_dir=shared_dir,
        base=job.chunk_base,
        frozen=changes.frozen if changes is not None else frozenset(),
        reused=changes.reused if changes is not None else frozenset(),
    )
    try:
        dcp.save(job.sharded.tensors, storage_writer=writer, process_group=ranks.commit)
    except BaseException as exc:
        mine = own_failure(exc, ranks.rank)
        if mine is not None:
            raise mine from exc
        return None  # another rank failed: it reports its own error
    return writer


def own_failure(exc: BaseException, rank: int) -> BaseException | None:
    """This rank's own error inside DCP's collective ``CheckpointException`` (which every
    rank raises when any rank failed), or ``exc`` itself if it is not one."""
    from torch.distributed.checkpoint.api import CheckpointException

    if not isinstance(exc, CheckpointException):
        return exc
    failure = exc.failures.get(rank)
    return None if failure is None else failure[0]


def _commit_or_discard(
    target: WriteTarget,
    job: SaveJob,
    model: Any,
    store: Any,
    reports: list[dict[str, Any]],
    failed: dict[int, str],
    location: str,
    shared_uri: str | None,
) -> dict[str, Any]:
    """On rank 0: the manifest and the commit when every rank succeeded, else the cleanup."""
    intact = (
        f"the checkpoint of step {job.previous_step} is still intact"
        if job.previous_step is not None
        else "no earlier checkpoint was affected"
    )
    where = f"{model.model_id} (run {target.run_id}, step {job.step})"
    if failed:
        _discard(target, model, store, shared_uri)
        log_unsaved_metrics(target, job)
        detail = "; ".join(f"rank {r}: {m}" for r, m in failed.items())
        return {
            "error": f"Saving step {job.step} of run {target.run_id} to {redact(location)} "
            f"failed on rank {', '.join(map(str, failed))} ({detail}). Nothing was committed; "
            f"{intact}. Fix the cause on that rank (space, permissions, network) and save again."
        }
    assert job.sharded is not None
    try:
        manifest = write_root(
            store,
            job.sharded,
            job.progress,
            target.spec,
            [RankFiles.from_json(rep["files"]) for rep in reports],
            model_id=model.model_id,
            run_id=target.run_id,
            step=job.step,
            epoch=job.epoch,
            metrics=job.metrics,
            triggers=job.triggers,
            created_at=job.timestamp_ms / 1000,
            before_manifest=target.check_writer,
            shared_uri=shared_uri,
        )
        score = verify_stored(store, manifest, target.verify, where)
    except VerificationFailed as exc:
        models.mark_invalid(target.client, model.model_id, str(exc))
        log_unsaved_metrics(target, job)
        return {
            "invalid": True,
            "error": f"Step {job.step} of run {target.run_id} was written to "
            f"{redact(location)} but failed verification ({exc}); it is tagged invalid; {intact}.",
        }
    except BaseException as exc:
        _discard(target, model, store, shared_uri)
        if not isinstance(exc, WriterConflictError):
            log_unsaved_metrics(target, job)
        return {
            "error": f"Saving step {job.step} of run {target.run_id} to {redact(location)} "
            f"failed on rank 0 ({reason(exc)}). Nothing was committed; {intact}."
        }
    try:
        if target.check_writer is not None:
            target.check_writer()
        committed = commit_model(target, job, model, manifest, score)
    except Exception as exc:
        return {
            "error": f"Step {job.step} of run {target.run_id} is stored at {redact(location)} "
            f"but could not be committed ({reason(exc)}). The next resume or `mlflow-ckpt gc` "
            "adopts it once the tracking server is reachable."
        }
    logger.info(
        "Committed distributed checkpoint %s (run %s, step %d, %d ranks, %.1f MB)",
        model.model_id,
        target.run_id,
        job.step,
        len(reports),
        manifest.size_bytes / 1e6,
    )
    return {"checkpoint": checkpoint_to_json(Checkpoint.from_logged_model(committed))}


def _discard(target: WriteTarget, model: Any, store: Any, shared_uri: str | None) -> None:
    """Remove a failed save (its files, then its LoggedModel); what cannot be removed now
    stays pending or failed, and the next resume or ``mlflow-ckpt gc`` removes it."""
    try:
        if store is None:
            store = open_store(model.artifact_location, target.transfer)
        with contextlib.suppress(Exception):
            store.close()
        if discard_failed(target.client, model, store) and shared_uri is not None:
            delete_groups(shared_uri, [model.model_id], target.transfer)  # never referenced
    except Exception as exc:
        logger.warning("Could not remove failed checkpoint %s yet: %s", model.model_id, exc)

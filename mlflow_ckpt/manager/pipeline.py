"""The one write path every save takes, in a world of one process or of many ranks.

1. Rank 0 creates the pending LoggedModel; every rank learns its folder.
2. Every rank writes its part (:meth:`SaveStrategy.write_part`) while the NaN/inf guard
   checks its state beside the writes (its verdict is needed only before the manifest).
3. Every rank reports its files, its error and its guard's verdict to every rank.
4. Rank 0 writes the manifest (:meth:`SaveStrategy.write_root`), verifies and commits, or
   discards the folder; every rank learns the outcome and raises the same error type.

A single process is a world of one (:meth:`RankGroup.alone`): its collectives are local
calls, so sync saves on the training thread, async saves on the background worker and
distributed saves all run this protocol. Any failure leaves the LoggedModel uncommitted (so
it is never listed or resumed from) and removes what was written; a lost writer lease is a
:class:`WriterConflictError` on every rank, any other failure a
:class:`CheckpointWriteError` naming the run, step, location and the rank that failed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

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
from mlflow_ckpt.folder import FolderSpec
from mlflow_ckpt.manager.ranks import RankError, RankGroup
from mlflow_ckpt.manager.verification import VerificationFailed, Verify, verify_stored
from mlflow_ckpt.snapshot import Snapshot
from mlflow_ckpt.snapshot.sharded import ShardedSnapshot
from mlflow_ckpt.storage import Store, TransferConfig, open_store, redact
from mlflow_ckpt.storage.routed import RoutedStore

if TYPE_CHECKING:
    from mlflow_ckpt.manager.resume import ResumePoint

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
    check_finite: bool = True  # the NaN/inf guard (nonfinite="skip"/"raise")


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
    # A milestone of an incremental run: written whole into its own folder, referencing no
    # earlier checkpoint's bytes (otherwise the strategy's newest base is referenced).
    self_contained: bool = False


class SaveStrategy(Protocol):
    """How one manager's saves lay out their folder: the part each rank writes, the root
    rank 0 writes last, and what the next save may build on. :class:`.local_write.LocalSave`
    (one process, one folder of files) and :class:`.distributed_write.ShardedSave` (every
    rank's own files plus DCP shards) implement it; :func:`write_checkpoint` runs either."""

    ranks: RankGroup

    def snapshot(
        self, progress: Mapping[str, Any], *, copy: bool, buffers: Any, whole: bool
    ) -> tuple[Snapshot, ShardedSnapshot | None]:
        """This rank's state now (host copies when ``copy``); ``whole``: reference nothing."""
        ...

    def first_nonfinite(self, job: SaveJob) -> str | None:
        """The first NaN/inf tensor of this rank's part of ``job``."""
        ...

    def write_part(
        self, store: Store | None, job: SaveJob, model_id: str, before_manifest: Callable[[], None]
    ) -> dict[str, Any]:
        """Write this rank's part; a JSON-able report of its files. Takes part in every
        collective even when ``store`` is ``None`` (opening it failed), then raises."""
        ...

    def write_root(
        self,
        store: Store,
        job: SaveJob,
        model: LoggedModel,
        parts: list[dict[str, Any]],
        before_manifest: Callable[[], None],
    ) -> Manifest:
        """On rank 0, once every part is stored: the rest of the folder, the manifest last."""
        ...

    def committed(self, job: SaveJob, checkpoint: Checkpoint) -> None:
        """``job`` is committed as ``checkpoint``: remember what the next save may reference."""
        ...

    def resumed(self, point: ResumePoint) -> None:
        """Training goes on from ``point``: the next save may reference its bytes."""
        ...

    def protected(self, last: Checkpoint | None) -> tuple[str, ...]:
        """Shared groups the next save may reference: never deleted meanwhile."""
        ...


class Diverged(Exception):
    """The state of a save holds NaN or inf: it was discarded, not committed."""

    def __init__(self, tensor: str) -> None:
        super().__init__(tensor)
        self.tensor = tensor


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


def intact(job: SaveJob) -> str:
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


class _Guard:
    """The NaN/inf check of one save, run on its own thread beside the writes.

    Its verdict is needed only before the manifest makes the checkpoint complete, so a
    healthy save does not wait for it on top of its writes; a diverged one is discarded.
    """

    def __init__(self, check: Callable[[], str | None] | None) -> None:
        self._found: str | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if check is not None:
            self._thread = threading.Thread(
                target=self._run, args=(check,), name="mlflow-ckpt-finite", daemon=True
            )
            self._thread.start()

    def _run(self, check: Callable[[], str | None]) -> None:
        try:
            self._found = check()
        except BaseException as exc:  # surfaces as this rank's error, on the caller's thread
            self._error = exc

    def verdict(self) -> str | None:
        """The first NaN/inf tensor found, once the check is done (``None``: all finite)."""
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self._found


@dataclass
class _Outcome:
    """What rank 0 decided, sent to every rank as JSON (``local``: rank 0's own exception)."""

    message: dict[str, Any]
    local: BaseException | None = None


def write_checkpoint(target: WriteTarget, job: SaveJob, strategy: SaveStrategy) -> Checkpoint:
    """Write one checkpoint with every rank of ``strategy`` and commit it.

    Raises :class:`Diverged` (nothing committed) when any rank's state holds NaN or inf.
    """
    ranks = strategy.ranks
    what = f"saving step {job.step} of run {target.run_id}"
    guard = _Guard((lambda: strategy.first_nonfinite(job)) if target.check_finite else None)
    model, created = _create(target, job, ranks, what)

    def before_manifest() -> None:
        if target.check_writer is not None:
            target.check_writer()
        found = guard.verdict()
        if found is not None:
            raise Diverged(found)

    store, report, error = _write_part(target, job, strategy, created, before_manifest)
    report["nonfinite"] = None  # (a guard that itself failed is this rank's error instead)
    try:
        report["nonfinite"] = guard.verdict()
    except Exception as exc:
        error = error or exc
    report["error"] = None if error is None else reason(error)
    report["conflict"] = str(error) if isinstance(error, WriterConflictError) else None
    try:
        reports = ranks.all_gather(report, group=ranks.commit, what=what)
    except RankError:
        _close(store)
        raise
    outcome = _Outcome({})
    if ranks.is_leader:
        assert model is not None
        outcome = _finish(target, job, strategy, model, store, reports, created)
    message = ranks.broadcast(outcome.message, group=ranks.commit, what=what)
    _close(store)
    if error is not None and not isinstance(error, Exception):
        raise error  # KeyboardInterrupt, SystemExit: the save is cleaned, the signal goes on
    return _result(job, strategy, message, outcome.local or error)


def _create(
    target: WriteTarget, job: SaveJob, ranks: RankGroup, what: str
) -> tuple[LoggedModel | None, dict[str, Any]]:
    """Rank 0 creates the pending LoggedModel; every rank learns where to write."""
    model, created, cause = None, {}, None
    if ranks.is_leader:
        try:
            model = create_model(target, job)
            created = {
                "model_id": model.model_id,
                "location": model.artifact_location,
                # incremental: the run's shared area (none for a milestone)
                "shared_uri": None if job.self_contained else target.shared_uri,
            }
        except Exception as exc:
            log_unsaved_metrics(target, job)
            cause = exc
            created = {
                "error": f"Could not create the LoggedModel for step {job.step} of run "
                f"{target.run_id} in {target.client.tracking_uri}: {exc}. "
                f"{intact(job).capitalize()}."
            }
    created = ranks.broadcast(created, group=ranks.commit, what=what)
    if "error" in created:
        raise CheckpointWriteError(created["error"]) from cause
    return model, created


def _write_part(
    target: WriteTarget,
    job: SaveJob,
    strategy: SaveStrategy,
    created: dict[str, Any],
    before_manifest: Callable[[], None],
) -> tuple[Store | None, dict[str, Any], BaseException | None]:
    """This rank's part: every failure is reported, never raised early (the others wait)."""
    store: Store | None = None
    error: BaseException | None = None
    part: dict[str, Any] = {}
    try:  # (the lease is checked before the manifest and the commit, where it matters)
        store = open_store(created["location"], target.transfer)
        if created["shared_uri"] is not None:  # incremental: lasting bytes, shared area
            store = RoutedStore(store, open_store(created["shared_uri"], target.transfer))
    except BaseException as exc:
        error = exc
    try:
        part = strategy.write_part(store, job, created["model_id"], before_manifest)
    except BaseException as exc:
        error = error or exc
    return store, {"part": part}, error


def _finish(
    target: WriteTarget,
    job: SaveJob,
    strategy: SaveStrategy,
    model: LoggedModel,
    store: Store | None,
    reports: list[dict[str, Any]],
    created: dict[str, Any],
) -> _Outcome:
    """On rank 0: the manifest, verification and commit when every rank succeeded, else
    the cleanup; what every rank is told (and rank 0's own exception, for its traceback)."""
    many = len(reports) > 1
    diverged = [
        f"{rep['nonfinite']} (rank {r})" if many else rep["nonfinite"]
        for r, rep in enumerate(reports)
        if rep["nonfinite"]
    ]
    failed = {r: rep["error"] for r, rep in enumerate(reports) if rep["error"]}
    if diverged or failed:
        _discard(target, model, store, created["shared_uri"])
        if diverged:
            return _Outcome({"kind": "nonfinite", "tensor": diverged[0]})
        conflicts = [rep["conflict"] for rep in reports if rep["conflict"]]
        return _failed(target, job, conflicts, failed, len(reports), created)
    assert store is not None
    where = f"{model.model_id} (run {target.run_id}, step {job.step})"
    location = redact(created["location"])
    try:
        parts = [r["part"] for r in reports]
        manifest = strategy.write_root(store, job, model, parts, target.check_writer or _noop)
        score = verify_stored(store, manifest, target.verify, where)
    except VerificationFailed as exc:
        models.mark_invalid(target.client, model.model_id, str(exc))
        log_unsaved_metrics(target, job)
        return _Outcome(
            {
                "kind": "invalid",
                "error": f"Step {job.step} of run {target.run_id} was written to {location} "
                f"but failed verification after the save ({exc}). It is tagged invalid and "
                "will never be listed or resumed from (`mlflow-ckpt gc` removes it); "
                f"{intact(job)}.",
            },
            exc,
        )
    except BaseException as exc:
        _discard(target, model, store, created["shared_uri"])
        conflicts = [str(exc)] if isinstance(exc, WriterConflictError) else []
        outcome = _failed(target, job, conflicts, {0: reason(exc)}, len(reports), created)
        return dataclasses.replace(outcome, local=exc)
    return _commit(target, job, model, manifest, score, location, len(reports))


def _noop() -> None:
    """(No lease to check: the verdicts of the NaN/inf guards are in already.)"""


def _failed(
    target: WriteTarget,
    job: SaveJob,
    conflicts: list[str],
    failed: dict[int, str],
    world_size: int,
    created: dict[str, Any],
) -> _Outcome:
    """The outcome of a save that failed on the ranks ``failed`` (already discarded)."""
    if conflicts:  # a lost lease: the run belongs to another process now; its record, too
        return _Outcome({"kind": "conflict", "error": conflicts[0]})
    log_unsaved_metrics(target, job)
    many = world_size > 1
    on = f" on rank {', '.join(map(str, failed))}" if many else ""
    detail = "; ".join(f"rank {r}: {m}" for r, m in failed.items()) if many else failed[0]
    return _Outcome(
        {
            "kind": "write",
            "error": f"Saving step {job.step} of run {target.run_id} to "
            f"{redact(created['location'])} failed{on} ({detail}). The new checkpoint is not "
            f"committed and will never be listed or resumed from; {intact(job)}. Fix the "
            "cause (space, permissions, network) and save again.",
        }
    )


def _commit(
    target: WriteTarget,
    job: SaveJob,
    model: LoggedModel,
    manifest: Manifest,
    score: Mapping[str, float],
    location: str,
    world_size: int,
) -> _Outcome:
    """Commit the stored checkpoint. The manifest is in the store: the checkpoint is
    complete. If this process lost the run meanwhile, it is left alone (the new owner's
    recovery adopts or finalizes it); if the commit fails, recovery adopts it later."""
    try:
        if target.check_writer is not None:
            target.check_writer()
        committed = commit_model(target, job, model, manifest, score)
    except WriterConflictError as exc:
        return _Outcome({"kind": "conflict", "error": str(exc)}, exc)
    except Exception as exc:
        return _Outcome(
            {
                "kind": "write",
                "error": f"Step {job.step} of run {target.run_id} is stored at {location} but "
                f"could not be committed in {target.client.tracking_uri} ({reason(exc)}). The "
                "next resume or `mlflow-ckpt gc` adopts it once the tracking server is "
                "reachable.",
            },
            exc,
        )
    logger.info(
        "Committed checkpoint %s (run %s, step %d, %d rank(s), %.1f MB)",
        model.model_id,
        target.run_id,
        job.step,
        world_size,
        manifest.size_bytes / 1e6,
    )
    return _Outcome(
        {
            "kind": "committed",
            "checkpoint": checkpoint_to_json(Checkpoint.from_logged_model(committed)),
        }
    )


_ERRORS: dict[str, type[Exception]] = {
    "conflict": WriterConflictError,
    "invalid": CheckpointVerificationError,
    "write": CheckpointWriteError,
}


def _result(
    job: SaveJob, strategy: SaveStrategy, message: dict[str, Any], cause: BaseException | None
) -> Checkpoint:
    """Rank 0's decision, the same on every rank: the checkpoint, or the error to raise."""
    kind = message["kind"]
    if kind == "committed":
        checkpoint = checkpoint_from_json(message["checkpoint"])
        strategy.committed(job, checkpoint)
        return checkpoint
    if kind == "nonfinite":
        raise Diverged(message["tensor"])
    raise _ERRORS[kind](message["error"]) from cause


def _close(store: Store | None) -> None:
    if store is not None:
        with contextlib.suppress(Exception):
            store.close()


def _discard(
    target: WriteTarget, model: LoggedModel, store: Store | None, shared_uri: str | None
) -> None:
    """Remove a failed save: its partial files, then its LoggedModel (best effort).

    The store is closed first so that no in-flight upload lands after the cleanup. What
    cannot be removed now stays tagged failed for the next resume or ``mlflow-ckpt gc``.
    """
    try:
        if store is None:
            store = open_store(model.artifact_location, target.transfer)
        _close(store)
        if discard_failed(target.client, model, store) and shared_uri is not None:
            delete_groups(shared_uri, [model.model_id], target.transfer)  # never referenced
    except Exception as exc:
        logger.warning("Could not remove failed checkpoint %s yet: %s", model.model_id, exc)

"""Which run a manager writes, and who it is in the job: the one place that decides.

In a single process the manager talks to MLflow itself. Under an initialized
``torch.distributed`` process group only rank 0 does: it opens (or resumes) the run, takes
the writer lease and recovers the run, then tells every rank the run's ID; the other ranks
need no MLflow setup and never construct a tracking client. A failure on rank 0 (no active
run, a writer conflict) is told to every rank too, so none waits forever.

Every rank must see the same artifact store: a local path that only some ranks see (no
shared file system between nodes) would silently give each node its own half-checkpoint.
Rank 0 leaves a probe file there and every rank looks for it, before any save.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run

from mlflow_ckpt.catalog import tags
from mlflow_ckpt.catalog.runs import get_run
from mlflow_ckpt.errors import CheckpointError
from mlflow_ckpt.manager.job import open_job_run
from mlflow_ckpt.manager.lease import RunClaim, take_run
from mlflow_ckpt.manager.options import ManagerOptions
from mlflow_ckpt.manager.ranks import RankGroup
from mlflow_ckpt.manager.records import active_or_given
from mlflow_ckpt.manager.resume import check_no_other_run
from mlflow_ckpt.snapshot import preserved_python_rng
from mlflow_ckpt.storage import local_path_of


@dataclass
class Session:
    """The run this manager writes; ``client``, ``run`` and ``claim`` are ``None`` on the
    ranks other than 0 of a distributed job (they never talk to MLflow)."""

    run_id: str
    experiment_id: str
    client: MlflowClient | None
    run: Run | None
    claim: RunClaim | None
    ranks: RankGroup | None
    nonfinite_step: str | None = None
    created: bool = False  # resume="auto" started the job's run just now (nothing to resume)

    def release(self) -> None:
        if self.claim is not None:
            self.claim.release()


def _open_here(options: ManagerOptions, run_id: str | None, resume: bool) -> Session:
    client = options.client or MlflowClient()
    created = False
    if options.job is not None:  # resume="auto": the job's own run, found or started
        run_id, created = open_job_run(client, options.job)
    elif resume:
        assert run_id is not None
        check_no_other_run(run_id)
    with preserved_python_rng():
        run = get_run(client, active_or_given(run_id))
    try:
        claim = take_run(
            client,
            run,
            force=options.force,
            ttl=options.lease_ttl,
            wait=options.job is not None,
        )
    except BaseException:
        if created:  # leave no active run behind: a restart finds the run by its key
            with preserved_python_rng():
                mlflow.end_run()
        raise
    return Session(
        run.info.run_id,
        run.info.experiment_id,
        client,
        run,
        claim,
        None,
        run.data.tags.get(tags.RUN_NONFINITE_STEP),
        created,
    )


def open_session(options: ManagerOptions, run_id: str | None, *, resume: bool) -> Session:
    """Open the run on this process (rank 0 only, in a distributed job) and share it."""
    ranks = RankGroup.detect() if options.distributed else None
    if ranks is None:
        return _open_here(options, run_id, resume)
    session: Session | None = None
    message: dict[str, Any]
    if ranks.is_leader:
        try:
            session = _open_here(options, run_id, resume)
            session.ranks = ranks
            message = {
                "run_id": session.run_id,
                "experiment_id": session.experiment_id,
                "nonfinite_step": session.nonfinite_step,
                "created": session.created,
                "probe": _leave_probe(session),
            }
        except BaseException as exc:
            ranks.broadcast(
                {"error": f"{type(exc).__name__}: {exc}"},
                group=ranks.control,
                what="opening the run",
            )
            raise
    else:
        message = {}
    message = ranks.broadcast(message, group=ranks.control, what="opening the run")
    if "error" in message:
        raise CheckpointError(
            f"Rank 0 could not open the MLflow run, so rank {ranks.rank} cannot either: "
            f"{message['error']}"
        )
    try:
        _check_shared(message["probe"], ranks)
    except BaseException:
        if session is not None:
            session.release()
        raise
    if session is not None:
        return session
    return Session(
        message["run_id"],
        message["experiment_id"],
        None,
        None,
        None,
        ranks,
        message["nonfinite_step"],
        message["created"],
    )


def _leave_probe(session: Session) -> str | None:
    """A file in the experiment's local artifact root, if it is local (else ``None``)."""
    assert session.client is not None
    root = session.client.get_experiment(session.experiment_id).artifact_location
    path = local_path_of(root)
    if path is None:
        return None
    probe = path / f".mlflow-ckpt-rank-probe-{uuid.uuid4().hex}"
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text(session.run_id)
    return str(probe)


def _check_shared(probe: str | None, ranks: RankGroup) -> None:
    """Every rank must see rank 0's local artifact root (a shared mount); else raise."""
    if probe is None:
        return
    seen = ranks.all_gather(Path(probe).is_file(), group=ranks.control, what="probing storage")
    if ranks.is_leader:
        with contextlib.suppress(OSError):
            Path(probe).unlink()
    blind = [r for r, ok in enumerate(seen) if not ok]
    if blind:
        root = Path(probe).parent
        raise CheckpointError(
            f"The artifact location {root} is a local path that rank(s) "
            f"{', '.join(map(str, blind))} cannot see (no shared file system between the "
            "nodes), so every node would write its own incomplete checkpoint. Use an object "
            "store (S3, GCS, Azure Blob: set the experiment's artifact location or run an "
            "`mlflow server` with --artifacts-destination) or a file system mounted at the "
            "same path on every node."
        )

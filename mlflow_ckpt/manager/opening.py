"""Opening a run for a manager: which run, its lease, and the checkpoint training goes on from.

Both constructors end here. ``CheckpointManager(...)`` takes the active run (or ``run_id=``)
and restores nothing; ``CheckpointManager.resume(run_id, ...)`` and ``resume="auto"`` (the
job's own run, found by its key or started) restore the newest checkpoint that verifies
first, and only then reopen the run as the active run. That order is what makes a resume
safe: restoring is all-or-nothing and comes before any write to the run, so a checkpoint
that does not fit leaves the objects and the run untouched (and the lease is given back).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mlflow_ckpt.manager.distributed_resume import restore_distributed
from mlflow_ckpt.manager.options import ManagerOptions
from mlflow_ckpt.manager.resume import ResumePoint, reopen_run, restore_newest
from mlflow_ckpt.manager.session import Session, open_session


@dataclass(frozen=True)
class OpenedRun:
    """The run a manager writes, and where training goes on (``None``: nothing resumed)."""

    session: Session
    point: ResumePoint | None


def open_run(
    state: Mapping[str, Any],
    options: ManagerOptions,
    run_id: str | None,
    *,
    restore: bool,
    strict: bool,
) -> OpenedRun:
    """Open the run (on rank 0: lease and recovery too) and, with ``restore``, restore its
    newest verified checkpoint into ``state`` and reopen the run as the active run.

    A run ``resume="auto"`` started just now has nothing to resume: its point is ``None``,
    as for a fresh manager. On any failure the lease is released before the error is raised.
    """
    session = open_session(options, run_id, resume=restore)
    if not restore:
        return OpenedRun(session, None)
    try:
        if session.ranks is None:
            assert session.client is not None
            point = restore_newest(
                session.client, session.run_id, session.experiment_id, state, strict=strict
            )
        else:
            point = restore_distributed(
                session.client, session.run_id, state, session.ranks, strict=strict
            )
        if session.client is not None:
            reopen_run(session.run_id)
    except BaseException:
        session.release()
        raise
    return OpenedRun(session, None if session.created else point)

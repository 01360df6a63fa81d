"""What the manager records on the run itself (not on its checkpoints).

At ``close()`` that includes a picture of the run's checkpoints, ``mlflow_ckpt/timeline.png``.

Tags that let tools answer without being told (what is monitored, how often it was resumed,
the first step refused as non-finite is tagged by the saver) and the params triggers choose at
the start (the adaptive save interval). All are written with the user's random streams kept
where they are.
"""

from __future__ import annotations

import logging

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Param, Run, RunTag

from mlflow_ckpt.catalog import Checkpoint, tags, timeline
from mlflow_ckpt.errors import NoActiveRunError
from mlflow_ckpt.snapshot import preserved_python_rng
from mlflow_ckpt.storage.staging import scratch_dir

logger = logging.getLogger(__name__)


def active_or_given(run_id: str | None) -> str:
    """``run_id``, or the active run's; the error says how to provide one."""
    if run_id is not None:
        return run_id
    active = mlflow.active_run()
    if active is None:
        raise NoActiveRunError(
            "CheckpointManager needs an MLflow run: call it inside `with mlflow.start_run():`, "
            "pass run_id=..., or continue an earlier run with "
            "CheckpointManager.resume(run_id, state)."
        )
    return active.info.run_id


def record_start(
    client: MlflowClient, run: Run, monitor: str | None, mode: str, params: dict[str, str]
) -> None:
    """Tag what is monitored; log the triggers' start params the run does not have yet."""
    wanted_tags = {tags.RUN_MONITOR: monitor, tags.RUN_MODE: mode} if monitor else {}
    new_tags = [RunTag(k, v) for k, v in wanted_tags.items() if run.data.tags.get(k) != v]
    new_params = [Param(k, v) for k, v in params.items() if k not in run.data.params]
    if new_tags or new_params:
        with preserved_python_rng():
            client.log_batch(run.info.run_id, params=new_params, tags=new_tags)


def record_resume(
    client: MlflowClient, run_id: str, resumes: int, chosen: Checkpoint | None
) -> None:
    """Tag the run with how often it was resumed and from which checkpoint."""
    with preserved_python_rng():
        client.set_tag(run_id, tags.RUN_RESUMES, str(resumes))
        client.set_tag(run_id, tags.RUN_RESUMED_FROM, chosen.uri if chosen else "")


def log_timeline(client: MlflowClient, run_id: str) -> None:
    """Draw the run's checkpoint timeline and log it as a run artifact (never raises: a
    picture must not fail a training that is otherwise done)."""
    try:
        with scratch_dir("plot") as scratch:
            path = timeline.render(
                timeline.gather(client, run_id), scratch / timeline.ARTIFACT_NAME
            )
            with preserved_python_rng():
                client.log_artifact(run_id, str(path), timeline.ARTIFACT_PATH)
    except Exception as exc:
        logger.warning("Could not log the checkpoint timeline of run %s: %s", run_id, exc)

"""Runs forked from a checkpoint: making one, and finding where one branched off.

A fork is a new run in the source's experiment, nested under the source run
(``mlflow.parentRunId``), holding the source's params, user tags and every metric point up
to and including the checkpoint's step (timestamps kept), so its charts continue the
source's curves. It holds no bytes of the source: until its first save it resumes from the
source's checkpoint itself (:func:`fork_point`, read only), and that first save is a full
one (the resume drops the incremental base of a checkpoint from another run), so retention
or ``mlflow gc`` on the source can never break a checkpoint of the fork.

MLflow has no hidden run that accepts writes (a deleted run refuses ``log_batch``), so the
copy is made visible-but-marked: the run is created tagged ``fork_status=copying`` and named
``... (copying)``; only the last write tags it ``ready`` and gives it its name. A fork whose
process died meanwhile is never resumed (:func:`fork_point` refuses it), and the next fork of
the same checkpoint (or ``mlflow-ckpt gc`` of the source run) deletes it
(:func:`delete_abandoned`); an error in this process deletes it at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.entities import LoggedModel, Metric, Param, Run, RunTag

from mlflow_ckpt.catalog import tags
from mlflow_ckpt.catalog.checkpoint import Checkpoint
from mlflow_ckpt.catalog.resolve import resolve
from mlflow_ckpt.catalog.runs import get_run
from mlflow_ckpt.errors import CheckpointError

logger = logging.getLogger(__name__)

# log_batch takes at most 1000 entities (metrics, params and tags together), 100 params.
_METRICS_PER_BATCH = 900
_PARAMS_PER_BATCH = 100
# A fork still "copying" whose last batch is older than this was left by a dead process.
ABANDONED_AFTER_S = 120.0


@dataclass(frozen=True)
class Fork:
    """A fork run made by :func:`create_fork`, with what it copied."""

    run: Run
    source: Checkpoint
    metric_points: int
    params: int


def create_fork(
    client: MlflowClient,
    checkpoint: Checkpoint | str,
    *,
    run_name: str | None = None,
    params: Mapping[str, object] | None = None,
) -> Fork:
    """Create the fork run of ``checkpoint`` with the source's records up to its step.

    ``params`` override copied params of the same name (a fork usually changes one: the
    learning rate); MLflow refuses to change a param once logged, so they are written
    with the copy. On any error the new run is deleted before the error is raised.
    """
    model = resolve(checkpoint, client)
    source = Checkpoint.from_logged_model(model)
    source_run = get_run(client, source.run_id)
    experiment_id = source_run.info.experiment_id
    delete_abandoned(client, experiment_id, source.uri)
    name = run_name or f"{source_run.info.run_name or source.run_id}-fork-{source.step}"
    run = client.create_run(
        experiment_id,
        run_name=f"{name} (copying)",
        tags=_fork_tags(source_run, model, source),
    )
    run_id = run.info.run_id
    try:
        merged = {**source_run.data.params, **{k: str(v) for k, v in (params or {}).items()}}
        points = 0
        for metrics, params_batch, beat in _batches(client, source_run, source.step, merged):
            client.log_batch(run_id, metrics=metrics, params=params_batch, tags=beat)
            points += len(metrics)
        client.update_run(run_id, name=name)
        client.set_tag(run_id, tags.FORK_STATUS, tags.READY)  # last: the fork is complete
    except BaseException as exc:
        _delete_quietly(client, run_id)
        if isinstance(exc, Exception):
            raise CheckpointError(
                f"Forking run {source.run_id} at {source.uri} (step {source.step}) failed "
                f"while copying its history into the new run {run_id}, which was deleted: "
                f"{exc}"
            ) from exc
        raise
    logger.info(
        "Forked run %s at step %d (%s) into run %s: %d metric points, %d params copied",
        source.run_id,
        source.step,
        source.uri,
        run_id,
        points,
        len(merged),
    )
    return Fork(get_run(client, run_id), source, points, len(merged))


def _fork_tags(source_run: Run, model: LoggedModel, source: Checkpoint) -> dict[str, str]:
    """The source's user tags (not MLflow's or ours), and the lineage."""
    own = {
        k: v for k, v in source_run.data.tags.items() if not k.startswith(("mlflow.", tags.PREFIX))
    }
    return {
        **own,
        tags.PARENT_RUN: source.run_id,
        tags.FORKED_FROM: f"models:/{model.model_id}",
        tags.FORKED_FROM_RUN: source.run_id,
        tags.FORKED_FROM_STEP: str(source.step),
        tags.FORK_STATUS: tags.COPYING,
        tags.FORK_HEARTBEAT: str(time.time()),
    }


def _batches(
    client: MlflowClient, source_run: Run, step: int, params: Mapping[str, str]
) -> Iterator[tuple[list[Metric], list[Param], list[RunTag]]]:
    """``log_batch`` contents: the params, then every metric point up to ``step`` (each
    batch also beats the heartbeat that tells a live copy from an abandoned one)."""
    items = sorted(params.items())
    for i in range(0, len(items), _PARAMS_PER_BATCH):
        yield [], [Param(k, v) for k, v in items[i : i + _PARAMS_PER_BATCH]], [_heartbeat()]
    pending: list[Metric] = []
    for key in sorted(source_run.data.metrics):
        for point in client.get_metric_history(source_run.info.run_id, key):
            if point.step <= step:  # (a new entity: the source's model links stay there)
                pending.append(Metric(key, point.value, point.timestamp, point.step))
            if len(pending) == _METRICS_PER_BATCH:
                yield pending, [], [_heartbeat()]
                pending = []
    if pending:
        yield pending, [], [_heartbeat()]


def _heartbeat() -> RunTag:
    return RunTag(tags.FORK_HEARTBEAT, str(time.time()))


def delete_abandoned(
    client: MlflowClient,
    experiment_id: str,
    source_uri: str | None = None,
    *,
    source_run: str | None = None,
    dry_run: bool = False,
) -> list[str]:
    """Delete the forks of checkpoint ``source_uri`` (or of any checkpoint of run
    ``source_run``) that a dead process left half-copied; their IDs (only listed with
    ``dry_run``). The next fork of a checkpoint calls it, and so does ``mlflow-ckpt gc``
    of the source run.

    A copy in progress beats its heartbeat with every batch (a fraction of a second apart),
    so one silent for :data:`ABANDONED_AFTER_S` is no longer being written.
    """
    source = (
        f"tags.`{tags.FORKED_FROM}` = '{source_uri}'"
        if source_uri is not None
        else f"tags.`{tags.FORKED_FROM_RUN}` = '{source_run}'"
    )
    found = client.search_runs(
        [experiment_id], filter_string=f"{source} AND tags.`{tags.FORK_STATUS}` = '{tags.COPYING}'"
    )
    deleted = []
    now = time.time()
    for run in found:
        beat = float(run.data.tags.get(tags.FORK_HEARTBEAT) or 0)
        if now - beat <= ABANDONED_AFTER_S:
            continue
        deleted.append(run.info.run_id)
        if dry_run:
            continue
        logger.warning(
            "Deleting run %s: an incomplete fork of %s (its process stopped while copying "
            "the history)",
            run.info.run_id,
            run.data.tags.get(tags.FORKED_FROM),
        )
        _delete_quietly(client, run.info.run_id)
    return deleted


def _delete_quietly(client: MlflowClient, run_id: str) -> None:
    try:
        client.delete_run(run_id)
    except Exception as exc:  # the error being raised matters more
        logger.warning("Could not delete the incomplete fork run %s: %s", run_id, exc)


def fork_point(client: MlflowClient, run_id: str) -> Checkpoint | None:
    """The checkpoint a fork run branched off (``None`` for a run that is not a fork).

    Only asked when the run has no verified checkpoint of its own. Raises when the fork is
    incomplete or the source checkpoint is gone: resuming would otherwise silently start
    from step 0.
    """
    run = get_run(client, run_id)
    uri = run.data.tags.get(tags.FORKED_FROM)
    if not uri:
        return None
    if run.data.tags.get(tags.FORK_STATUS) != tags.READY:
        raise CheckpointError(
            f"Run {run_id} is an incomplete fork of {uri}: copying the source's history "
            f"was interrupted. Fork again (mlflow_ckpt.fork({uri!r}, state) or "
            f"`mlflow-ckpt fork {uri}`): that deletes this run."
        )
    try:
        return Checkpoint.from_logged_model(resolve(uri, client))
    except CheckpointError as exc:
        raise CheckpointError(
            f"Run {run_id} was forked from {uri} and has no checkpoint of its own yet, but "
            f"that checkpoint can no longer be read: {exc}"
        ) from exc

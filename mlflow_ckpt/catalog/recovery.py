"""Finish the bookkeeping of saves that were killed after their bytes were complete.

A save commits in this order: files, ``manifest.json``, metrics (linked to the model), run
output link, ``committed`` tag. A process killed between the manifest and the tag leaves a
checkpoint whose data is complete and verifiable but which is invisible. Resuming from an
older checkpoint would then redo that step and log its metrics a second time. Instead,
recovery adopts such checkpoints: it verifies them, logs whatever of their metrics the run
does not have yet, and commits them. Pending checkpoints without a valid manifest were
never complete: they are discarded, files first (temporary files of a write cut short
included), then their LoggedModel. Deletions cut short (status ``deleting``) are finished.

Only the holder of the run's writer lease may call these: a live writer's in-flight save
looks exactly like a killed one.
"""

from __future__ import annotations

import logging

from mlflow import MlflowClient
from mlflow.entities import LoggedModel, Run

from mlflow_ckpt.catalog import models, tags
from mlflow_ckpt.catalog.deletion import delete_checkpoint, discard_failed
from mlflow_ckpt.catalog.queries import search_models
from mlflow_ckpt.catalog.reader import manifest_digest, read_checkpoint
from mlflow_ckpt.catalog.resolve import describe
from mlflow_ckpt.errors import CheckpointCorruptedError, CheckpointError, CheckpointNotFoundError
from mlflow_ckpt.storage.staging import sweep_stale_staging

logger = logging.getLogger(__name__)


def logged_pairs(client: MlflowClient, run_id: str) -> set[tuple[str, int]]:
    """Every (metric, step) pair in the run's history."""
    run = client.get_run(run_id)
    return {
        (key, metric.step)
        for key in run.data.metrics
        for metric in client.get_metric_history(run_id, key)
    }


def _with_status(client: MlflowClient, run: Run, status: str) -> list[LoggedModel]:
    return search_models(
        client,
        [run.info.experiment_id],
        f"source_run_id = '{run.info.run_id}' AND tags.`{tags.STATUS}` = '{status}'",
    )


def recover_run(client: MlflowClient, run: Run) -> list[str]:
    """Everything a restart must clean up: adopt or fail pending saves, finish deletions,
    remove the upload staging folders of killed processes.

    Returns the IDs of the adopted checkpoints.
    """
    adopted = recover_pending(client, run)
    sweep_stale_staging()  # upload staging folders of killed processes on this host
    for model in _with_status(client, run, tags.DELETING):
        try:
            delete_checkpoint(client, model.model_id)
            logger.info("Finished the interrupted deletion of %s", describe(model))
        except Exception as exc:
            logger.warning("Could not finish deleting %s: %s", describe(model), exc)
    return adopted


def sweep_failed(client: MlflowClient, run: Run) -> list[str]:
    """Remove what failed saves left behind (e.g. when the network was down) and checkpoints
    that failed verification after their save: files, then the LoggedModel. Returns the IDs
    of the saves removed."""
    leftovers = _with_status(client, run, tags.FAILED) + _with_status(client, run, tags.INVALID)
    return [model.model_id for model in leftovers if discard_failed(client, model)]


def recover_pending(client: MlflowClient, run: Run) -> list[str]:
    """Adopt complete-but-uncommitted checkpoints of ``run``; fail the incomplete ones.

    Call only when no other process is writing checkpoints for the run (at resume).
    Returns the IDs of the adopted checkpoints.
    """
    run_id = run.info.run_id
    pending = _with_status(client, run, tags.PENDING)
    if not pending:
        return []
    history = logged_pairs(client, run_id)
    linked = {o.model_id for o in (run.outputs.model_outputs if run.outputs else [])}
    adopted = []
    for model in pending:
        if model.tags.get(tags.VALIDATION) == "pending":
            # Killed while the user's validation ran (or before it could record a failure):
            # the checkpoint was never approved, so it must not become the one resumed from.
            logger.warning("Discarding %s: its validation never finished", describe(model))
            discard_failed(client, model)
            continue
        try:
            manifest = read_checkpoint(model).manifest
        except (CheckpointNotFoundError, CheckpointCorruptedError) as exc:
            # No manifest, or files that don't match it: this save never completed.
            logger.warning("Discarding interrupted save %s: %s", describe(model), exc)
            discard_failed(client, model)
            continue
        except (CheckpointError, OSError) as exc:
            # Unreachable store, a newer format...: it may well be complete. Never delete
            # on a passing error; the next resume or `mlflow-ckpt gc` looks again.
            logger.warning("Leaving interrupted save %s pending: %s", describe(model), exc)
            continue
        missing = {k: v for k, v in manifest.metrics.items() if (k, manifest.step) not in history}
        models.commit(
            client,
            model,
            run_id=run_id,
            step=manifest.step,
            metrics=missing,
            timestamp_ms=int(manifest.created_at * 1000),
            size_bytes=manifest.size_bytes,
            stored_bytes=manifest.stored_bytes,
            shared_groups=manifest.shared_groups,
            manifest_sha256=manifest_digest(model),
            link_run=model.model_id not in linked,
        )
        logger.info("Recovered interrupted save %s", describe(model))
        adopted.append(model.model_id)
    return adopted

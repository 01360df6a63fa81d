"""Finish the bookkeeping of saves that were killed after their bytes were complete.

A save commits in this order: files, ``manifest.json``, metrics (linked to the model), run
output link, ``committed`` tag. A process killed between the manifest and the tag leaves a
checkpoint whose data is complete and verifiable but which is invisible. Resuming from an
older checkpoint would then redo that step and log its metrics a second time. Instead,
recovery adopts such checkpoints: it verifies them, logs whatever of their metrics the run
does not have yet, and commits them. Pending checkpoints without a valid manifest were
never complete: they are finalized as FAILED and their files removed.
"""

from __future__ import annotations

import logging

from mlflow import MlflowClient
from mlflow.entities import Run

from mlflow_ckpt.catalog import models, tags
from mlflow_ckpt.catalog.queries import search_models
from mlflow_ckpt.catalog.reader import describe, read_checkpoint
from mlflow_ckpt.errors import CheckpointError
from mlflow_ckpt.storage import open_store

logger = logging.getLogger(__name__)


def logged_pairs(client: MlflowClient, run_id: str) -> set[tuple[str, int]]:
    """Every (metric, step) pair in the run's history."""
    run = client.get_run(run_id)
    return {
        (key, metric.step)
        for key in run.data.metrics
        for metric in client.get_metric_history(run_id, key)
    }


def recover_pending(client: MlflowClient, run: Run) -> list[str]:
    """Adopt complete-but-uncommitted checkpoints of ``run``; fail the incomplete ones.

    Call only when no other process is writing checkpoints for the run (at resume).
    Returns the IDs of the adopted checkpoints.
    """
    run_id = run.info.run_id
    pending = search_models(
        client,
        [run.info.experiment_id],
        f"source_run_id = '{run_id}' AND tags.`{tags.STATUS}` = '{tags.PENDING}'",
    )
    if not pending:
        return []
    history = logged_pairs(client, run_id)
    linked = {o.model_id for o in (run.outputs.model_outputs if run.outputs else [])}
    adopted = []
    for model in pending:
        try:
            manifest = read_checkpoint(model).manifest
        except (CheckpointError, OSError) as exc:
            logger.warning("Discarding interrupted save %s: %s", describe(model), exc)
            models.mark_failed(client, model.model_id)
            try:
                open_store(model.artifact_location).delete_all()
            except Exception:
                logger.warning("Could not delete files of %s", describe(model), exc_info=True)
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
            link_run=model.model_id not in linked,
        )
        logger.info("Recovered interrupted save %s", describe(model))
        adopted.append(model.model_id)
    return adopted

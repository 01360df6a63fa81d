"""Deleting a checkpoint safely: hide it, delete its bytes, then its LoggedModel.

The order matters. The ``deleting`` status tag comes first so that no query lists the
checkpoint (and no resume picks it) while its files are half gone. Bytes go before the
LoggedModel because MLflow's ``delete_logged_model`` is a soft delete that leaves every file
behind. A checkpoint that a registered model version points to is never deleted: the
registry downloads from its location.

A save that failed or was interrupted goes the same way once it is known never to complete
(:func:`discard_failed`): its files first, then its LoggedModel, so the MLflow UI's Models tab
keeps no "Failed" rows. Until its files are gone it stays tagged ``failed``: that tag is what
``mlflow-ckpt gc`` finds to retry the cleanup.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import LoggedModel

from mlflow_ckpt.catalog import models, tags
from mlflow_ckpt.catalog.resolve import describe
from mlflow_ckpt.catalog.runs import get_logged_model
from mlflow_ckpt.storage import LocalStore, Store, open_store, redact

logger = logging.getLogger(__name__)


def is_registered(model: LoggedModel) -> bool:
    """Whether a registered model version points to this checkpoint."""
    return bool(model.tags.get(tags.MODEL_VERSIONS, "").strip("[] "))


def is_pinned(model: LoggedModel) -> bool:
    """Whether the checkpoint is pinned (``mlflow_ckpt.pinned``): retention never deletes it."""
    return bool(model.tags.get(tags.PINNED))


def delete_checkpoint(client: MlflowClient, model_id: str) -> bool:
    """Delete one checkpoint's files and LoggedModel. False if it is registered or pinned."""
    model = get_logged_model(client, model_id)  # fresh: promoted or pinned meanwhile?
    if is_registered(model) or is_pinned(model):
        logger.info("Keeping checkpoint %s: it is registered or pinned", model_id)
        return False
    client.set_logged_model_tags(model_id, {tags.STATUS: tags.DELETING})
    _delete_files(model)
    client.delete_logged_model(model_id)
    logger.info("Deleted checkpoint %s (step %s)", model_id, model.tags.get(tags.STEP))
    return True


def _delete_files(model: LoggedModel, store: Store | None = None) -> None:
    store = store or open_store(model.artifact_location)
    store.delete_all()
    own = getattr(store, "own", store)  # a save's routed store: its own folder
    if isinstance(own, LocalStore):
        _remove_empty(Path(own.root).parent)  # MLflow leaves models/<id>/ behind


def remove_files(model: LoggedModel, store: Store | None = None) -> bool:
    """Best-effort removal of an uncommitted checkpoint's files; whether it succeeded."""
    try:
        _delete_files(model, store)
    except Exception:
        logger.warning(
            "Could not delete the files of checkpoint %s at %s; `mlflow-ckpt gc` retries",
            model.model_id,
            redact(model.artifact_location),
            exc_info=True,
        )
        return False
    return True


def _remove_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()


def discard_failed(client: MlflowClient, model: LoggedModel, store: Store | None = None) -> bool:
    """Finalize a save that will never complete: tag it failed, remove its files, delete it.

    The LoggedModel is deleted only once its files are gone; otherwise it stays ``failed``
    for ``mlflow-ckpt gc`` to retry. ``store`` is the save's own open store, if it has one.
    Returns whether nothing is left.
    """
    if model.tags.get(tags.STATUS) not in (tags.FAILED, tags.INVALID):
        models.mark_failed(client, model.model_id)
    if not remove_files(model, store):
        return False
    try:
        client.delete_logged_model(model.model_id)
    except Exception:
        logger.warning("Could not delete the LoggedModel of failed save %s", describe(model))
        return False
    logger.info("Removed failed save %s (files and LoggedModel)", describe(model))
    return True

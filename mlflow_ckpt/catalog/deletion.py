"""Deleting a checkpoint safely: hide it, delete its bytes, then its LoggedModel.

The order matters. The ``deleting`` status tag comes first so that no query lists the
checkpoint (and no resume picks it) while its files are half gone. Bytes go before the
LoggedModel because MLflow's ``delete_logged_model`` is a soft delete that leaves every file
behind. A checkpoint that a registered model version points to is never deleted: the
registry downloads from its location.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import LoggedModel

from mlflow_ckpt.catalog import tags
from mlflow_ckpt.catalog.runs import get_logged_model
from mlflow_ckpt.storage import LocalStore, open_store, redact

logger = logging.getLogger(__name__)


def is_registered(model: LoggedModel) -> bool:
    """Whether a registered model version points to this checkpoint."""
    return bool(model.tags.get(tags.MODEL_VERSIONS, "").strip("[] "))


def delete_checkpoint(client: MlflowClient, model_id: str) -> bool:
    """Delete one checkpoint's files and LoggedModel. Returns False if it is registered."""
    model = get_logged_model(client, model_id)  # fresh: it may have been promoted meanwhile
    if is_registered(model):
        logger.info("Keeping checkpoint %s: a registered model version uses it", model_id)
        return False
    client.set_logged_model_tags(model_id, {tags.STATUS: tags.DELETING})
    _delete_files(model)
    client.delete_logged_model(model_id)
    logger.info("Deleted checkpoint %s (step %s)", model_id, model.tags.get(tags.STEP))
    return True


def _delete_files(model: LoggedModel) -> None:
    store = open_store(model.artifact_location)
    store.delete_all()
    if isinstance(store, LocalStore):
        _remove_empty(Path(store.root).parent)  # MLflow leaves models/<id>/ behind


def remove_files(model: LoggedModel) -> bool:
    """Best-effort removal of an uncommitted checkpoint's files; whether it succeeded."""
    try:
        _delete_files(model)
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

"""From a checkpoint reference to its LoggedModel: ``Checkpoint``, ``models:/m-...``,
``m-...``, or a registered version (``models:/name@alias``, ``models:/name/3``).

Only committed checkpoints resolve: a pending, failed or corrupt one is refused with the
reason, so nothing half-written is ever loaded.
"""

from __future__ import annotations

import re

from mlflow import MlflowClient
from mlflow.entities import LoggedModel
from mlflow.exceptions import MlflowException

from mlflow_ckpt.catalog import tags
from mlflow_ckpt.catalog.checkpoint import Checkpoint
from mlflow_ckpt.catalog.runs import get_logged_model, is_not_found
from mlflow_ckpt.errors import CheckpointNotFoundError

_MODEL_ID = re.compile(r"^m-[0-9a-f]{32}$")
_MODEL_ID_IN = re.compile(r"m-[0-9a-f]{32}")


def resolve(ref: Checkpoint | str, client: MlflowClient) -> LoggedModel:
    """Find the LoggedModel behind a Checkpoint, ``models:/m-...``, ``m-...`` or registry URI."""
    if isinstance(ref, Checkpoint):
        model_id = ref.model_id
    elif not isinstance(ref, str):
        raise TypeError(f"expected a Checkpoint or a URI string, got {type(ref).__name__}")
    elif _MODEL_ID.match(ref):
        model_id = ref
    elif ref.startswith("models:/"):
        rest = ref.removeprefix("models:/").strip("/")
        model_id = rest if _MODEL_ID.match(rest) else _registry_model_id(rest, ref, client)
    else:
        raise CheckpointNotFoundError(
            f"{ref!r} is not a checkpoint URI; use 'models:/m-<id>' (Checkpoint.uri), a "
            "registered model 'models:/<name>@<alias>' or 'models:/<name>/<version>'."
        )
    model = get_logged_model(client, model_id)
    status = model.tags.get(tags.STATUS)
    if status != tags.COMMITTED:
        reason = {
            tags.PENDING: "its save never finished (the process died or is still writing)",
            tags.FAILED: "its save failed",
            tags.CORRUPT: "it failed verification earlier",
            tags.INVALID: "it failed verification after its save",
        }.get(status or "", "it was not written by mlflow_ckpt")
        raise CheckpointNotFoundError(
            f"LoggedModel {model_id} (run {model.source_run_id}, step "
            f"{model.tags.get(tags.STEP, '?')}) is not a committed checkpoint: {reason}. "
            "Use mlflow_ckpt.list_checkpoints(run_id) to find a good one."
        )
    return model


def _registry_model_id(rest: str, uri: str, client: MlflowClient) -> str:
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = rest.rpartition("/")
            version = client.get_model_version(name, number)
    except MlflowException as exc:
        if not is_not_found(exc):
            raise
        raise CheckpointNotFoundError(f"No registered model version for {uri!r}") from exc
    if version.model_id:
        return version.model_id
    # The SQL registry does not store model_id; the source still names the LoggedModel.
    found = _MODEL_ID_IN.search(version.source or "")
    if not found:
        raise CheckpointNotFoundError(f"{uri!r} is a model version without a LoggedModel")
    return found.group(0)


def describe(model: LoggedModel) -> str:
    """How a checkpoint is named in messages: ID, run and step."""
    return f"{model.model_id} (run {model.source_run_id}, step {model.tags.get(tags.STEP, '?')})"

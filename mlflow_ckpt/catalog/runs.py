"""Looking up runs and LoggedModels, with our own errors for the ones that don't exist."""

from __future__ import annotations

from mlflow import MlflowClient
from mlflow.entities import LoggedModel, Run
from mlflow.exceptions import MlflowException

# The codes MlflowException.error_code carries are named only in MLflow's protos (no public
# module); unchanged from MLflow 3.0.0 to 3.17.2, which .ci/compat runs.
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from mlflow_ckpt.errors import CheckpointNotFoundError

_NOT_FOUND = ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


def is_not_found(exc: MlflowException) -> bool:
    """Whether an MLflow error means "no such entity"."""
    return exc.error_code == _NOT_FOUND or "not found" in str(exc).lower()


def get_run(client: MlflowClient, run_id: str) -> Run:
    """Return the run, or raise :class:`CheckpointNotFoundError` naming the tracking URI."""
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if not is_not_found(exc) and "invalid" not in str(exc).lower():
            raise
        raise CheckpointNotFoundError(
            f"No MLflow run {run_id!r} in tracking store {client.tracking_uri!r}. Check the run "
            "ID (it is printed by the training script and shown in the MLflow UI) and that "
            "MLFLOW_TRACKING_URI points at the same store."
        ) from exc
    if run.info.lifecycle_stage == "deleted":
        raise CheckpointNotFoundError(
            f"Run {run_id!r} is deleted in {client.tracking_uri!r}; restore it "
            "(`mlflow runs restore`) before using its checkpoints."
        )
    return run


def get_logged_model(client: MlflowClient, model_id: str) -> LoggedModel:
    """Return the LoggedModel, or raise :class:`CheckpointNotFoundError`."""
    try:
        return client.get_logged_model(model_id)
    except MlflowException as exc:
        if not is_not_found(exc):
            raise
        raise CheckpointNotFoundError(
            f"No checkpoint (LoggedModel) {model_id!r} in tracking store "
            f"{client.tracking_uri!r}: it never existed or was deleted by retention. "
            "`mlflow_ckpt.list_checkpoints(run_id)` lists the run's checkpoints."
        ) from exc

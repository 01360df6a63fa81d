"""Promoting a checkpoint to the MLflow model registry."""

from __future__ import annotations

from collections.abc import Mapping

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from mlflow_ckpt.catalog.checkpoint import Checkpoint
from mlflow_ckpt.catalog.detach import make_self_contained
from mlflow_ckpt.catalog.resolve import resolve
from mlflow_ckpt.snapshot import preserved_python_rng


def promote(
    checkpoint_or_uri: Checkpoint | str,
    registered_model_name: str,
    alias: str | None = "champion",
    tags: Mapping[str, str] | None = None,
    *,
    client: MlflowClient | None = None,
) -> ModelVersion:
    """Register a checkpoint's LoggedModel as a new model version and point ``alias`` at it.

    ``mlflow.pyfunc.load_model(f"models:/{name}@{alias}")`` then serves exactly that
    checkpoint. Promoted checkpoints are never deleted by retention (MLflow tags the
    LoggedModel ``mlflow.modelVersions`` and the registry downloads from its files). An
    incremental checkpoint first becomes self-contained: the bytes it shares with other
    checkpoints of its run are copied into its own folder, so the version outlives the run.
    """
    client = client or MlflowClient()
    model = resolve(checkpoint_or_uri, client)
    with preserved_python_rng():
        make_self_contained(client, model)
        version = mlflow.register_model(
            f"models:/{model.model_id}",
            registered_model_name,
            tags=dict(tags or {}),
        )
        if alias:
            client.set_registered_model_alias(registered_model_name, alias, version.version)
    return client.get_model_version(registered_model_name, version.version)

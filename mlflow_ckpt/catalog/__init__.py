"""Catalog layer: checkpoints as MLflow LoggedModels, found and loaded by MLflow queries."""

from mlflow_ckpt.catalog.checkpoint import Checkpoint
from mlflow_ckpt.catalog.queries import best_checkpoint, latest_checkpoint, list_checkpoints
from mlflow_ckpt.catalog.reader import load, load_model, load_training_state, resolve

__all__ = [
    "Checkpoint",
    "best_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load",
    "load_model",
    "load_training_state",
    "resolve",
]

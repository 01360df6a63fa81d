"""Catalog layer: checkpoints as MLflow LoggedModels, found and loaded by MLflow queries."""

from mlflow_ckpt.catalog.checkpoint import Checkpoint
from mlflow_ckpt.catalog.export import diff_checkpoints, export_onnx, export_safetensors
from mlflow_ckpt.catalog.queries import best_checkpoint, latest_checkpoint, list_checkpoints
from mlflow_ckpt.catalog.reader import load, load_model, load_training_state, resolve
from mlflow_ckpt.catalog.registry import promote

__all__ = [
    "Checkpoint",
    "best_checkpoint",
    "diff_checkpoints",
    "export_onnx",
    "export_safetensors",
    "latest_checkpoint",
    "list_checkpoints",
    "load",
    "load_model",
    "load_training_state",
    "promote",
    "resolve",
]

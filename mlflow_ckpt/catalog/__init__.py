"""Catalog layer: checkpoints as MLflow LoggedModels, found and loaded by MLflow queries."""

from mlflow_ckpt.catalog.checkpoint import Checkpoint
from mlflow_ckpt.catalog.export import diff_checkpoints, export_onnx, export_safetensors
from mlflow_ckpt.catalog.loading import load, load_model, load_training_state
from mlflow_ckpt.catalog.queries import best_checkpoint, latest_checkpoint, list_checkpoints
from mlflow_ckpt.catalog.reader import VerifiedCheckpoint, newest_verified
from mlflow_ckpt.catalog.registry import promote
from mlflow_ckpt.catalog.resolve import describe, resolve

__all__ = [
    "Checkpoint",
    "VerifiedCheckpoint",
    "best_checkpoint",
    "describe",
    "diff_checkpoints",
    "export_onnx",
    "export_safetensors",
    "latest_checkpoint",
    "list_checkpoints",
    "load",
    "load_model",
    "load_training_state",
    "newest_verified",
    "promote",
    "resolve",
]

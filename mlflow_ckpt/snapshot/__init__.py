"""Snapshot layer: collect the training state into host memory and restore it."""

from mlflow_ckpt.snapshot.finite import first_nonfinite
from mlflow_ckpt.snapshot.rng import capture_rng, preserved_python_rng, restore_rng
from mlflow_ckpt.snapshot.snapshot import (
    DecodedState,
    Snapshot,
    decode_document,
    plain_state,
    restore,
    take_snapshot,
)

__all__ = [
    "DecodedState",
    "Snapshot",
    "capture_rng",
    "decode_document",
    "first_nonfinite",
    "plain_state",
    "preserved_python_rng",
    "restore",
    "restore_rng",
    "take_snapshot",
]

"""Manager layer: when to save, the one write path, retention, resume, run ownership.

The trigger and retention classes are importable from here for ``triggers=[...]`` and
``retention=...``; a user's own classes need only follow the small protocols in
:mod:`mlflow_ckpt.manager.triggers` and :mod:`mlflow_ckpt.manager.retention`.
"""

from mlflow_ckpt.manager.manager import CheckpointManager
from mlflow_ckpt.manager.retention import (
    KeepAny,
    KeepBestN,
    KeepEveryNSteps,
    KeepLastN,
    RetentionPolicy,
)
from mlflow_ckpt.manager.triggers import (
    BestMetric,
    EveryNEpochs,
    EveryNSeconds,
    EveryNSteps,
    StepInfo,
    Trigger,
)

__all__ = [
    "BestMetric",
    "CheckpointManager",
    "EveryNEpochs",
    "EveryNSeconds",
    "EveryNSteps",
    "KeepAny",
    "KeepBestN",
    "KeepEveryNSteps",
    "KeepLastN",
    "RetentionPolicy",
    "StepInfo",
    "Trigger",
]

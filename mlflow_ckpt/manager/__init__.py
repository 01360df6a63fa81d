"""Manager layer: triggers, the background save pipeline, resume."""

from mlflow_ckpt.manager.manager import CheckpointManager
from mlflow_ckpt.manager.triggers import BestMetric, EveryNEpochs, EveryNSeconds, EveryNSteps

__all__ = ["BestMetric", "CheckpointManager", "EveryNEpochs", "EveryNSeconds", "EveryNSteps"]

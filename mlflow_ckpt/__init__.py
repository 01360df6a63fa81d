"""mlflow_ckpt: training checkpoints that live in MLflow.

One call in the training loop saves the whole training state as an MLflow LoggedModel
linked to the run; the same checkpoint resumes the run bit-for-bit, serves through pyfunc,
and is found again by MLflow queries. The docs site (``docs/``) has the guides.

The names below are the whole public API (at most 25, on purpose). Rarer errors
(``NoActiveRunError``, ``StateSerializationError``, ``WriterConflictError``) live in
:mod:`mlflow_ckpt.errors`; all derive from :class:`CheckpointError`.
"""

from mlflow_ckpt._version import __version__
from mlflow_ckpt.after_training import average, evaluate, fork
from mlflow_ckpt.autolog import autolog
from mlflow_ckpt.catalog import (
    Checkpoint,
    best_checkpoint,
    export_onnx,
    latest_checkpoint,
    list_checkpoints,
    load,
    load_model,
    load_training_state,
    promote,
)
from mlflow_ckpt.errors import (
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    StateMismatchError,
)
from mlflow_ckpt.integrations.resume_path import resume_path
from mlflow_ckpt.manager import CheckpointManager

__all__ = [
    "Checkpoint",
    "CheckpointCorruptedError",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "StateMismatchError",
    "__version__",
    "autolog",
    "average",
    "best_checkpoint",
    "evaluate",
    "export_onnx",
    "fork",
    "latest_checkpoint",
    "list_checkpoints",
    "load",
    "load_model",
    "load_training_state",
    "promote",
    "resume_path",
]

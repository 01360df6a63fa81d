"""Framework values as checkpoint state: held framework checkpoints, metrics, extras.

Nothing here imports Lightning or transformers: those are optional extras, imported lazily
(through :func:`require`) by the modules that need them.
"""

from __future__ import annotations

import importlib
import numbers
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

# The state name under which each integration stores its framework's own checkpoint.
LIGHTNING_KEY = "lightning"
HF_TRAINER_STATE_KEY = "hf_trainer_state"
#: The Trainer callback's entry in ``TrainerState.stateful_callbacks``: which MLflow run a
#: resume continues (and the temporary folder it resumes from, see ``resume_folder``).
HF_CALLBACK_ENTRY = "MlflowCheckpointCallback"


def require(module: str, extra: str) -> ModuleType:
    """Import an optional framework or fail with the command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"mlflow_ckpt's {extra} integration needs the {module!r} package, which is not "
            f"installed: pip install 'mlflow-ckpt[{extra}]'"
        ) from exc


def numeric_metrics(values: Mapping[str, Any] | None) -> dict[str, float]:
    """The numeric entries of a framework's metric dict (tensors and numbers) as floats.

    Frameworks mix strings and nested values into their logs; only scalars can be metrics.
    """
    out: dict[str, float] = {}
    for key, value in (values or {}).items():
        if not isinstance(key, str):
            continue
        if hasattr(value, "numel") and callable(value.numel):
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        out[key] = float(value)
    return out


class HeldState:
    """A ``Stateful`` whose state is produced by a framework at save time.

    ``state_dict()`` calls ``provider`` (e.g. Lightning's ``dump_checkpoint``);
    ``load_state_dict()`` ignores what it is given: the framework restores itself from the
    file :func:`mlflow_ckpt.resume_path` writes, before the manager reopens the run (keeping
    it would hold a second copy of the weights and optimizer for the rest of training).
    """

    keeps_loaded_tensors = False  # restore need not copy what load_state_dict ignores

    def __init__(self, provider: Callable[[], Mapping[str, Any]]) -> None:
        self._provider = provider

    def state_dict(self) -> Mapping[str, Any]:
        return self._provider()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        del state

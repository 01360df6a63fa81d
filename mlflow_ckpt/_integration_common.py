"""Pieces shared by the framework integrations (autolog, Lightning, Hugging Face).

The integrations sit on top of :class:`~mlflow_ckpt.CheckpointManager`: they decide *when* a
framework has finished a step and *what* state it needs to resume, and leave saving, logging,
retention and resume to the manager. Nothing here imports Lightning or transformers: those
are optional extras, imported lazily by the modules that need them.
"""

from __future__ import annotations

import importlib
import logging
import math
import numbers
import uuid
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

import mlflow

from mlflow_ckpt.catalog import Checkpoint, list_checkpoints, load_training_state
from mlflow_ckpt.errors import CheckpointCorruptedError, CheckpointError, CheckpointNotFoundError
from mlflow_ckpt.manager import CheckpointManager
from mlflow_ckpt.snapshot import preserved_python_rng

logger = logging.getLogger(__name__)

# The state name under which each integration stores its framework's own checkpoint.
LIGHTNING_KEY = "lightning"
HF_TRAINER_STATE_KEY = "hf_trainer_state"


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


def start_run_if_needed() -> tuple[str, bool]:
    """The active run's ID, starting a run first if there is none; returns (run_id, started).

    The run gets an explicit name: MLflow invents names from Python's global ``random``, which
    would shift the training's random stream and break bit-for-bit resume.
    """
    active = mlflow.active_run()
    if active is not None:
        return active.info.run_id, False
    with preserved_python_rng():
        run = mlflow.start_run(run_name=f"mlflow-ckpt-{uuid.uuid4().hex[:8]}")
    logger.info("Started MLflow run %s for checkpoints", run.info.run_id)
    return run.info.run_id, True


def end_run_if_started(run_id: str | None, started: bool) -> None:
    """End the run we started ourselves (and only that one), like mlflow autolog does."""
    if not started or run_id is None:
        return
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        with preserved_python_rng():
            mlflow.end_run()


class HeldState:
    """A ``Stateful`` whose state is produced by a framework at save time.

    ``state_dict()`` calls ``provider`` (e.g. Lightning's ``dump_checkpoint``);
    ``load_state_dict()`` ignores what it is given: the framework restores itself from the
    file :func:`mlflow_ckpt.resume_path` writes, before the manager reopens the run (keeping
    it would hold a second copy of the weights and optimizer for the rest of training).
    """

    def __init__(self, provider: Callable[[], Mapping[str, Any]]) -> None:
        self._provider = provider

    def state_dict(self) -> Mapping[str, Any]:
        return self._provider()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        del state


def check_resumed_step(manager: CheckpointManager, framework_step: int, run_id: str) -> None:
    """Refuse a resume whose framework checkpoint is not the run's newest good checkpoint.

    The manager restores the newest checkpoint that verifies; a framework checkpoint from
    elsewhere (Lightning's own ``last.ckpt``, an older ``checkpoint-N``) would mix two states.
    """
    if manager.start_step == framework_step:
        return
    manager.close()
    raise CheckpointError(
        f"The checkpoint given to the trainer is at global step {framework_step}, but the newest "
        f"good checkpoint of MLflow run {run_id} continues at step {manager.start_step}. "
        f"Resume from `mlflow_ckpt.resume_path({run_id!r})` so that both are the same."
    )


def newest_training_state(run_id: str) -> tuple[Checkpoint, dict[str, Any]]:
    """The newest checkpoint of ``run_id`` whose files verify, and its state as plain data.

    Corrupt checkpoints are skipped with a warning, as :meth:`CheckpointManager.resume` does.
    """
    ckpts = list_checkpoints(run_id)
    for ckpt in ckpts:
        try:
            return ckpt, load_training_state(ckpt)
        except (CheckpointCorruptedError, CheckpointNotFoundError) as exc:
            logger.warning("Skipping checkpoint %s (step %d): %s", ckpt.uri, ckpt.step, exc)
    raise CheckpointNotFoundError(
        f"Run {run_id} has no committed checkpoint that verifies ({len(ckpts)} found), so "
        "there is nothing to resume from. `mlflow-ckpt list RUN_ID` shows its checkpoints; "
        "start the training from scratch instead."
    )


def finite(value: float | None) -> bool:
    """Whether a metric value can count for "best" (NaN and inf never do)."""
    return value is not None and math.isfinite(value)

"""The global random streams a training loop draws from: Python, NumPy, torch CPU and CUDA.

They are captured with every checkpoint so that a resumed run continues the very same
streams (dropout masks, shuffles, augmentations) and ends bit-for-bit where an uninterrupted
run would have.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from mlflow_ckpt.errors import CheckpointCorruptedError

logger = logging.getLogger(__name__)


def capture_rng() -> dict[str, Any]:
    """Return the current state of every global random stream."""
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def check_rng(states: Any, where: str) -> None:
    """Refuse saved RNG states that cannot be applied, before anything is restored.

    Each state is tried on a private generator of the same kind, so the global streams
    stay untouched and a bad checkpoint fails before the model is written to.
    """
    if not isinstance(states, dict):
        raise CheckpointCorruptedError(f"{where}: the saved RNG states are not an object")
    checks: dict[str, Any] = {
        "python": lambda v: random.Random().setstate(v),
        "numpy": lambda v: np.random.RandomState().set_state(v),
        "torch": lambda v: torch.Generator().set_state(v),
    }
    for key, check in checks.items():
        try:
            check(states[key])
        except Exception as exc:
            raise CheckpointCorruptedError(
                f"{where}: the saved {key} random state (_rng/{key}) cannot be restored "
                f"({type(exc).__name__}: {exc})",
                path=f"_rng/{key}",
            ) from exc
    cuda = states.get("cuda")
    if cuda is not None and (
        not isinstance(cuda, list)
        or not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda)
    ):
        raise CheckpointCorruptedError(f"{where}: the saved CUDA random states are malformed")


def restore_rng(states: dict[str, Any]) -> None:
    """Put every global random stream back to a state from :func:`capture_rng`."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if cuda is not None:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
            torch.cuda.set_rng_state_all(cuda)
        else:
            logger.warning(
                "The checkpoint holds CUDA RNG states for %d device(s) but %d are visible; "
                "CUDA random streams are not restored, so GPU dropout will differ.",
                len(cuda),
                torch.cuda.device_count() if torch.cuda.is_available() else 0,
            )


@contextlib.contextmanager
def preserved_python_rng() -> Iterator[None]:
    """Undo any draw from Python's global ``random`` made inside the block.

    MLflow draws from it to invent run and model names; called from the training thread,
    that would shift the user's stream. Use only on the thread that trains: restoring from
    another thread would undo the training loop's own draws.
    """
    state = random.getstate()
    try:
        yield
    finally:
        random.setstate(state)

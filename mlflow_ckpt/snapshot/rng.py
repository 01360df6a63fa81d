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

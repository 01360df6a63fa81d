"""The ``torch`` tensor format: ``torch.save`` files that load with ``weights_only=True``.

Only a flat ``{name: tensor}`` dict is ever pickled, and the loader refuses anything else,
so a tampered file cannot execute code on load.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import torch

from mlflow_ckpt.errors import CheckpointCorruptedError


def write(f: BinaryIO, items: Sequence[tuple[str, torch.Tensor]]) -> list[int | None]:
    """Write ``items`` with ``torch.save``; offsets are not meaningful in a zip archive."""
    torch.save(dict(items), f)
    return [None] * len(items)


def read(
    path: Path, where: str
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int | None, int]]]:
    """Load a tensor file with ``weights_only=True`` and check it holds only tensors.

    Returns the tensors and, like the other formats' readers, their offsets: none here, as
    offsets are not meaningful in a zip archive (the manifest records none)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError) as exc:
        raise CheckpointCorruptedError(
            f"{where}: {path.name} is not a loadable weights-only torch file ({exc})",
            path=path.name,
        ) from exc
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        raise CheckpointCorruptedError(
            f"{where}: {path.name} does not hold a flat dict of tensors", path=path.name
        )
    return data, {}

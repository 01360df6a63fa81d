"""Is a snapshot worth keeping? Find NaN or inf in its floating-point tensors.

A run whose weights turned NaN would otherwise keep committing NaN checkpoints, and with
``keep_last_n`` those push the last good ones out: the run could not be recovered. The
check runs on the snapshot (the host copy an async save takes anyway, or the live CPU
tensors of a sync save), never on GPU memory, in bounded chunks so it allocates little.

Tensors are what diverge (weights, optimizer moments, buffers). Python numbers in the state
are not checked: schedulers keep legitimate ``inf`` sentinels there (``ReduceLROnPlateau``'s
``best`` before its first step).
"""

from __future__ import annotations

import torch

from mlflow_ckpt.snapshot.snapshot import PROGRESS_PATH, RNG_PATH, Snapshot

_CHUNK = 1 << 22  # elements checked at a time: bounds the temporary mask to 4 MiB


def first_nonfinite(snapshot: Snapshot) -> str | None:
    """The name of the first floating-point state tensor holding NaN or inf, or ``None``.

    The random streams and the progress record (whose metrics may be NaN) do not count.
    """
    for name, tensor in snapshot.tensors.items():
        if name.startswith((RNG_PATH, PROGRESS_PATH)):
            continue
        if (tensor.is_floating_point() or tensor.is_complex()) and not _finite(tensor):
            return name
    return None


def _finite(tensor: torch.Tensor) -> bool:
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        if not bool(torch.isfinite(flat[start : start + _CHUNK]).all()):
            return False
    return True

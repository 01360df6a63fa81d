"""Is a snapshot worth keeping? Find NaN or inf in its floating-point tensors.

A run whose weights turned NaN would otherwise keep committing NaN checkpoints, and with
``keep_last_n`` those push the last good ones out: the run could not be recovered. The
check runs on the snapshot (the host copy an async save takes anyway, or the live CPU
tensors of a sync save), never on GPU memory, as one vectorised sum per tensor (about the
speed of reading memory) with an exact check only for tensors whose sum is not finite.

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
    reused = snapshot.changes.reused if snapshot.changes is not None else frozenset()
    for name, tensor in snapshot.tensors.items():
        if name.startswith((RNG_PATH, PROGRESS_PATH)) or name in reused:
            continue  # reused: checked when first saved, unchanged since
        if (tensor.is_floating_point() or tensor.is_complex()) and not _finite(tensor):
            return name
    return None


def _finite(tensor: torch.Tensor) -> bool:
    """Whether every element is finite: a sum first (one vectorised pass, no allocation; a
    finite sum means no NaN/inf), an exact check only when the sum is not finite (NaN/inf, or
    finite values whose sum overflowed)."""
    if tensor.is_complex():
        tensor = torch.view_as_real(tensor)
    wide = torch.float32 if tensor.element_size() < 4 else tensor.dtype  # half types, fp8
    try:
        if bool(torch.isfinite(tensor.sum(dtype=wide))):
            return True
    except RuntimeError:  # a dtype sum does not support: check exactly
        pass
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start : start + _CHUNK]
        if not bool(torch.isfinite(chunk.to(wide)).all()):
            return False
    return True

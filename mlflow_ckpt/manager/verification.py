"""Verify after save: is what reached the store really the checkpoint we meant to write?

Runs after the manifest is stored and before the commit, on the background worker for async
saves. ``"size"`` (the default) checks every file's size through one store listing per folder;
``"hash"`` re-reads every stored file and re-hashes it (a download, on a remote store);
a callable ``validate(model) -> bool | float`` also rebuilds the network from the stored
checkpoint (with ``model_factory``) and runs it: ``False``, a non-finite number or an
exception fails the checkpoint; a number is logged as ``verify_score`` and linked to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from mlflow_ckpt.codec import Manifest, check_sizes, verify_files
from mlflow_ckpt.errors import CheckpointCorruptedError
from mlflow_ckpt.folder import load_folder_model
from mlflow_ckpt.storage import Store, StoreError
from mlflow_ckpt.storage.staging import scratch_dir

Verify = str | Callable[[Any], Any]
VERIFY_MODES = ("size", "hash")
SCORE_METRIC = "verify_score"


class VerificationFailed(Exception):
    """The stored checkpoint is not what was written, or the user's validation refused it."""


def verify_stored(store: Store, manifest: Manifest, verify: Verify, where: str) -> dict[str, float]:
    """Check the stored folder; return the metrics to link to the checkpoint (the score).

    Raises :class:`VerificationFailed` when the checkpoint is wrong (a size or hash that
    differs, a validation that refuses it or cannot run on it). A store that cannot be read
    right now raises its own error: the save then fails like any failed write, and is
    retried, instead of marking good bytes invalid.
    """
    try:
        check_sizes(store, manifest, where)
        if verify == "hash":
            with scratch_dir("verify") as scratch:
                verify_files(store, manifest, scratch, where)
    except CheckpointCorruptedError as exc:
        raise VerificationFailed(str(exc)) from exc
    if not callable(verify):
        return {}
    try:
        value = verify(load_folder_model(store, where, manifest.digest()))
    except StoreError:
        raise
    except Exception as exc:
        raise VerificationFailed(f"{type(exc).__name__}: {exc}") from exc
    name = getattr(verify, "__name__", type(verify).__name__)
    if value is None or isinstance(value, bool):
        if value is False:
            raise VerificationFailed(f"{name}(model) returned False")
        return {SCORE_METRIC: 1.0} if value else {}
    try:
        score = float(value)
    except (TypeError, ValueError) as exc:
        raise VerificationFailed(f"{name}(model) returned {value!r}, not a bool or number") from exc
    if not math.isfinite(score):
        raise VerificationFailed(f"{name}(model) returned {score}")
    return {SCORE_METRIC: score}

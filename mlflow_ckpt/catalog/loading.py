"""Loading one checkpoint by reference: into live objects, as plain data, or as a network."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from mlflow import MlflowClient

from mlflow_ckpt.catalog import tags
from mlflow_ckpt.catalog.checkpoint import Checkpoint
from mlflow_ckpt.catalog.reader import read_checkpoint
from mlflow_ckpt.catalog.resolve import describe, resolve
from mlflow_ckpt.folder import load_folder_model
from mlflow_ckpt.snapshot import plain_state, restore
from mlflow_ckpt.storage import open_store


def load(
    uri_or_checkpoint: Checkpoint | str,
    state: Mapping[str, Any],
    *,
    strict: bool = False,
    restore_rng: bool = True,
    client: MlflowClient | None = None,
) -> Checkpoint:
    """Restore ``state`` in place from one checkpoint and return its record.

    Every file's hash (BLAKE3; SHA-256 in older checkpoints) is checked first; nothing is
    restored unless all of ``state`` fits (``StateMismatchError`` lists missing, unexpected
    and mismatched names). ``state`` may name a subset of what was saved
    (``{"model": model}``) unless ``strict=True``. Entries that cannot be updated in place
    (numbers, strings) are replaced in ``state`` if it is a dict. ``restore_rng`` also
    restores the global Python/NumPy/torch random streams.
    """
    client = client or MlflowClient()
    model = resolve(uri_or_checkpoint, client)
    loaded = read_checkpoint(model, state)
    restore(
        loaded.decoded,
        state,
        strict=strict,
        restore_rng_streams=restore_rng,
        where=describe(model),
    )
    return Checkpoint.from_logged_model(model)


def load_training_state(
    uri_or_checkpoint: Checkpoint | str, *, client: MlflowClient | None = None
) -> dict[str, Any]:
    """The whole saved state as plain data (tensors, dicts, numbers), with no objects needed.

    Keys are the state names given to the manager, plus ``_rng`` (the random streams) and
    ``_progress`` (step, epoch, metrics).

    Large tensors are views of the checkpoint's file, mapped privately from the page cache:
    reading them costs no copy, and writing to one never reaches the file, but the first
    write to each page pays a copy-on-write fault. Clone what you will update in place
    (an optimizer's moments before ``optimizer.load_state_dict``: about 1 s of faults at the
    first step for 600 MB otherwise); :func:`load` makes those copies itself.
    """
    client = client or MlflowClient()
    return plain_state(read_checkpoint(resolve(uri_or_checkpoint, client)).decoded)


def load_model(
    uri_or_checkpoint: Checkpoint | str, *, client: MlflowClient | None = None
) -> torch.nn.Module:
    """Rebuild ``state["model"]`` with the checkpoint's ``model_factory``, in eval mode.

    The checkpoint's own ``code/`` (saved with ``code_paths=``) is importable for this.
    """
    model = resolve(uri_or_checkpoint, client or MlflowClient())
    with open_store(model.artifact_location) as store:
        return load_folder_model(store, describe(model), tags.manifest_digests(model.tags))

"""Loading a checkpoint by URI: resolve it in MLflow, fetch, verify every hash, restore."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModel
from mlflow.exceptions import MlflowException

from mlflow_ckpt import flavor
from mlflow_ckpt.catalog import tags
from mlflow_ckpt.catalog.checkpoint import Checkpoint
from mlflow_ckpt.catalog.runs import get_logged_model, is_not_found
from mlflow_ckpt.codec import MANIFEST_NAME, FileEntry, check_file, read_manifest
from mlflow_ckpt.codec.hashing import sha256_file
from mlflow_ckpt.errors import CheckpointCorruptedError, CheckpointError, CheckpointNotFoundError
from mlflow_ckpt.snapshot import LoadedFolder, plain_state, read_folder, restore
from mlflow_ckpt.storage import open_store

_MODEL_ID = re.compile(r"^m-[0-9a-f]{32}$")
_MODEL_ID_IN = re.compile(r"m-[0-9a-f]{32}")


def resolve(ref: Checkpoint | str, client: MlflowClient) -> LoggedModel:
    """Find the LoggedModel behind a Checkpoint, ``models:/m-...``, ``m-...`` or registry URI."""
    if isinstance(ref, Checkpoint):
        model_id = ref.model_id
    elif not isinstance(ref, str):
        raise TypeError(f"expected a Checkpoint or a URI string, got {type(ref).__name__}")
    elif _MODEL_ID.match(ref):
        model_id = ref
    elif ref.startswith("models:/"):
        rest = ref.removeprefix("models:/").strip("/")
        model_id = rest if _MODEL_ID.match(rest) else _registry_model_id(rest, ref, client)
    else:
        raise CheckpointNotFoundError(
            f"{ref!r} is not a checkpoint URI; use 'models:/m-<id>' (Checkpoint.uri), a "
            "registered model 'models:/<name>@<alias>' or 'models:/<name>/<version>'."
        )
    model = get_logged_model(client, model_id)
    status = model.tags.get(tags.STATUS)
    if status != tags.COMMITTED:
        reason = {
            tags.PENDING: "its save never finished (the process died or is still writing)",
            tags.FAILED: "its save failed",
            tags.CORRUPT: "it failed verification earlier",
        }.get(status or "", "it was not written by mlflow_ckpt")
        raise CheckpointNotFoundError(
            f"LoggedModel {model_id} (run {model.source_run_id}, step "
            f"{model.tags.get(tags.STEP, '?')}) is not a committed checkpoint: {reason}. "
            "Use mlflow_ckpt.list_checkpoints(run_id) to find a good one."
        )
    return model


def _registry_model_id(rest: str, uri: str, client: MlflowClient) -> str:
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = rest.rpartition("/")
            version = client.get_model_version(name, number)
    except MlflowException as exc:
        if not is_not_found(exc):
            raise
        raise CheckpointNotFoundError(f"No registered model version for {uri!r}") from exc
    if version.model_id:
        return version.model_id
    # The SQL registry does not store model_id; the source still names the LoggedModel.
    found = _MODEL_ID_IN.search(version.source or "")
    if not found:
        raise CheckpointNotFoundError(f"{uri!r} is a model version without a LoggedModel")
    return found.group(0)


def describe(model: LoggedModel) -> str:
    """How a checkpoint is named in messages: ID, run and step."""
    return f"{model.model_id} (run {model.source_run_id}, step {model.tags.get(tags.STEP, '?')})"


def read_checkpoint(model: LoggedModel) -> LoadedFolder:
    """Fetch and verify every file of a checkpoint, then decode it."""
    where = describe(model)
    with (
        open_store(model.artifact_location) as store,
        tempfile.TemporaryDirectory(prefix="mlflow-ckpt-load-") as scratch,
    ):
        try:
            return read_folder(store, Path(scratch), where, model.tags.get(tags.MANIFEST_SHA256))
        except FileNotFoundError as exc:
            raise CheckpointNotFoundError(
                f"Checkpoint {where} has no manifest.json at {model.artifact_location}: it was "
                "never committed or its files were deleted."
            ) from exc


def manifest_digest(model: LoggedModel) -> str:
    """SHA-256 of a checkpoint's stored ``manifest.json`` bytes (recorded when committing)."""
    with (
        open_store(model.artifact_location) as store,
        tempfile.TemporaryDirectory(prefix="mlflow-ckpt-manifest-") as scratch,
    ):
        return sha256_file(store.fetch(MANIFEST_NAME, Path(scratch)))[0]


def verify_checkpoint(
    model: LoggedModel, on_file: Callable[[FileEntry], None] | None = None
) -> list[CheckpointCorruptedError]:
    """Re-hash every file of a checkpoint; return one error per bad file (empty when sound).

    Unlike loading, this does not stop at the first bad file, so a report can name them all.
    """
    where = describe(model)
    store = open_store(model.artifact_location)
    problems: list[CheckpointCorruptedError] = []
    with tempfile.TemporaryDirectory(prefix="mlflow-ckpt-verify-") as scratch:
        try:
            manifest = read_manifest(
                store, Path(scratch), where, model.tags.get(tags.MANIFEST_SHA256)
            )
        except FileNotFoundError:
            return [
                CheckpointCorruptedError(f"{where}: manifest.json is missing", path="manifest.json")
            ]
        except CheckpointCorruptedError as exc:
            return [exc]
        except CheckpointError as exc:  # a newer format: it cannot be checked, so it fails
            return [_as_problem(exc, MANIFEST_NAME)]
        for entry in manifest.files:
            try:
                local = check_file(store, entry, Path(scratch), where)
            except CheckpointCorruptedError as exc:
                problems.append(exc)
            else:
                if local.is_relative_to(scratch):
                    local.unlink()  # keep at most one downloaded file around
            if on_file is not None:
                on_file(entry)
        if not problems:
            try:
                read_checkpoint(model)  # parse headers and structure too
            except CheckpointCorruptedError as exc:
                problems.append(exc)
            except CheckpointError as exc:
                problems.append(_as_problem(exc, MANIFEST_NAME))
    return problems


def _as_problem(exc: CheckpointError, path: str) -> CheckpointCorruptedError:
    """Report an error that is not corruption (a newer format...) in the verify list."""
    problem = CheckpointCorruptedError(str(exc), path=path)
    problem.__cause__ = exc
    return problem


def load(
    uri_or_checkpoint: Checkpoint | str,
    state: Mapping[str, Any],
    *,
    strict: bool = False,
    restore_rng: bool = True,
    client: MlflowClient | None = None,
) -> Checkpoint:
    """Restore ``state`` in place from one checkpoint and return its record.

    Every file's SHA-256 is checked first; nothing is restored unless all of ``state`` fits
    (``StateMismatchError`` lists missing, unexpected and mismatched names). ``state`` may
    name a subset of what was saved (``{"model": model}``) unless ``strict=True``. Entries
    that cannot be updated in place (numbers, strings) are replaced in ``state`` if it is a
    dict. ``restore_rng`` also restores the global Python/NumPy/torch random streams.
    """
    client = client or MlflowClient()
    model = resolve(uri_or_checkpoint, client)
    loaded = read_checkpoint(model)
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
    """
    client = client or MlflowClient()
    return plain_state(read_checkpoint(resolve(uri_or_checkpoint, client)).decoded)


def load_model(
    uri_or_checkpoint: Checkpoint | str, *, client: MlflowClient | None = None
) -> torch.nn.Module:
    """Rebuild ``state["model"]`` with the checkpoint's ``model_factory``, in eval mode."""
    client = client or MlflowClient()
    model = resolve(uri_or_checkpoint, client)
    where = describe(model)
    store = open_store(model.artifact_location)
    with tempfile.TemporaryDirectory(prefix="mlflow-ckpt-load-") as scratch:
        loaded = read_checkpoint(model)
        mlmodel = store.fetch("MLmodel", Path(scratch))
        config = flavor.flavor_config(mlmodel.parent)
    return flavor.build_model(config, loaded, where)

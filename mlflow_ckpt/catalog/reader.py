"""Reading checkpoints found in the catalog: fetch, verify every hash, decode.

:func:`newest_verified` is the one answer to "which checkpoint does this run continue
from?": the manager's resume, the framework integrations and ``resume_path`` all use it, so
a corrupt checkpoint is treated the same everywhere (warned about, tagged, skipped).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import LoggedModel

from mlflow_ckpt.catalog import models, tags
from mlflow_ckpt.catalog.checkpoint import Checkpoint
from mlflow_ckpt.catalog.lineage import fork_point
from mlflow_ckpt.catalog.queries import committed_checkpoints, newest_committed
from mlflow_ckpt.catalog.resolve import describe, resolve
from mlflow_ckpt.catalog.runs import get_run
from mlflow_ckpt.codec import MANIFEST_NAME, FileEntry, check_file, read_manifest
from mlflow_ckpt.codec.hashing import hash_file
from mlflow_ckpt.codec.layout import with_shared
from mlflow_ckpt.errors import CheckpointCorruptedError, CheckpointError, CheckpointNotFoundError
from mlflow_ckpt.folder import LoadedFolder, read_folder
from mlflow_ckpt.snapshot.direct import planar_names
from mlflow_ckpt.storage import open_store
from mlflow_ckpt.storage.staging import scratch_dir


def read_checkpoint(model: LoggedModel, into: Mapping[str, Any] | None = None) -> LoadedFolder:
    """Fetch and verify every file of a checkpoint, then decode it.

    ``into``: the objects it will be restored into, if any; the compressed tensors of
    their modules then stay planes until the restore (:mod:`mlflow_ckpt.snapshot.direct`).
    """
    where = describe(model)
    planar = planar_names(into).__contains__ if into else None
    with (
        open_store(model.artifact_location) as store,
        scratch_dir("load") as scratch,
    ):
        try:
            return read_folder(store, scratch, where, tags.manifest_digests(model.tags), planar)
        except FileNotFoundError as exc:
            raise CheckpointNotFoundError(
                f"Checkpoint {where} has no manifest.json at {model.artifact_location}: it was "
                "never committed or its files were deleted."
            ) from exc


@dataclass(frozen=True)
class VerifiedCheckpoint:
    """A checkpoint whose every file verified, with its decoded content."""

    checkpoint: Checkpoint
    model: LoggedModel
    loaded: LoadedFolder


def newest_verified(
    run_id: str,
    client: MlflowClient,
    experiment_id: str | None = None,
    into: Mapping[str, Any] | None = None,
) -> VerifiedCheckpoint | None:
    """The newest committed checkpoint of ``run_id`` whose files verify, or ``None``.

    A forked run with none of its own continues from the checkpoint it was forked from
    (read only: see :mod:`.lineage`).

    Each one that fails is skipped with a warning naming it and the bad file; a corrupt one
    is also tagged ``mlflow_ckpt.status=corrupt``, so later lookups skip it unread.
    ``into``: the objects it will be restored into (see :func:`read_checkpoint`).
    """
    experiment_id = experiment_id or get_run(client, run_id).info.experiment_id
    for ckpt in _newest_lazily(client, run_id, experiment_id):
        try:
            model = resolve(ckpt, client)
            loaded = read_checkpoint(model, into)
        except (CheckpointCorruptedError, CheckpointNotFoundError) as exc:
            warnings.warn(
                f"Skipping checkpoint {ckpt.uri} (step {ckpt.step}) of run {run_id}: {exc}",
                stacklevel=3,
            )
            if isinstance(exc, CheckpointCorruptedError):
                models.mark_corrupt(client, ckpt.model_id)
            continue
        return VerifiedCheckpoint(ckpt, model, loaded)
    return None


def _newest_lazily(client: MlflowClient, run_id: str, experiment_id: str) -> Iterator[Checkpoint]:
    """The run's committed checkpoints, newest step first, listed only if the newest fails
    (a resume of a run of 10,000 checkpoints then costs three small requests, not ten
    pages); last, for a forked run, the source checkpoint it branched off."""
    newest = newest_committed(client, run_id, experiment_id)
    if newest is not None:
        yield newest
        for ckpt in committed_checkpoints(client, run_id, experiment_id):
            if ckpt.model_id != newest.model_id:
                yield ckpt
    source = fork_point(client, run_id)
    if source is not None:
        yield source


def manifest_digest(model: LoggedModel) -> str:
    """SHA-256 of a checkpoint's stored ``manifest.json`` bytes (recorded when committing)."""
    with (
        open_store(model.artifact_location) as store,
        scratch_dir("manifest") as scratch,
    ):
        return hash_file(store.fetch(MANIFEST_NAME, scratch), "sha256")[0]


def verify_checkpoint(
    model: LoggedModel, on_file: Callable[[FileEntry], None] | None = None
) -> list[CheckpointCorruptedError]:
    """Re-hash every file of a checkpoint; return one error per bad file (empty when sound).

    Unlike loading, this does not stop at the first bad file, so a report can name them all.
    """
    where = describe(model)
    store = open_store(model.artifact_location)
    problems: list[CheckpointCorruptedError] = []
    with scratch_dir("verify") as scratch:
        try:
            manifest = read_manifest(store, scratch, where, tags.manifest_digests(model.tags))
        except FileNotFoundError:
            return [
                CheckpointCorruptedError(f"{where}: manifest.json is missing", path="manifest.json")
            ]
        except CheckpointCorruptedError as exc:
            return [exc]
        except CheckpointError as exc:  # a newer format: it cannot be checked, so it fails
            return [_as_problem(exc, MANIFEST_NAME)]
        store = with_shared(store, manifest)
        for entry in manifest.files:
            try:
                local = check_file(store, entry, scratch, where)
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

"""Write one checkpoint folder into a store: state files, ``MLmodel``, code, manifest last.

:func:`write_folder` is the only function that lays a folder out. The manager's save
pipeline and the flavor's ``save_model`` both call it, so checkpoint bytes are written once
and never re-uploaded as pyfunc artifacts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import safetensors
import torch

from mlflow_ckpt._version import __version__
from mlflow_ckpt.codec import (
    DEFAULT_MAX_SHARD_BYTES,
    SINGLE_FORMAT_VERSION,
    STRUCTURE_FILE,
    FileEntry,
    Manifest,
    format_version_for,
    write_file,
    write_manifest,
    write_state,
)
from mlflow_ckpt.errors import CheckpointError
from mlflow_ckpt.folder.incremental import Base, write_incremental
from mlflow_ckpt.folder.mlmodel import CODE_DIR, mlmodel_yaml
from mlflow_ckpt.snapshot import Snapshot
from mlflow_ckpt.storage import Store
from mlflow_ckpt.storage.routed import RoutedStore


@dataclass(frozen=True)
class FolderSpec:
    """How checkpoint folders are written: format, sharding, and how to rebuild the model."""

    format: str = "safetensors"
    compression: str | None = None  # "zstd": shards as byte-grouped zstd blocks (.ztensors)
    compression_level: int = 1
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    model_factory: str | None = None
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    code_paths: tuple[str, ...] = ()


def library_versions() -> dict[str, str]:
    """Versions recorded in every manifest, for debugging format questions later."""
    return {
        "mlflow_ckpt": __version__,
        "torch": str(torch.__version__),
        "mlflow": mlflow.__version__,
        "safetensors": safetensors.__version__,
    }


def write_folder(
    store: Store,
    snapshot: Snapshot,
    spec: FolderSpec,
    *,
    model_id: str,
    run_id: str,
    step: int,
    epoch: int | None = None,
    metrics: Mapping[str, float] | None = None,
    triggers: Sequence[str] = (),
    created_at: float | None = None,
    before_manifest: Callable[[], None] | None = None,
    base: Base | None = None,
) -> Manifest:
    """Write one complete checkpoint folder into ``store``; the manifest goes last.

    ``before_manifest`` runs once every other file is stored, right before the commit
    marker: the manager checks there that it still owns the run. When ``store`` is a
    :class:`RoutedStore` (the folder plus the run's shared area) the save is incremental:
    only what changed since ``base`` is written (see :mod:`.incremental`).
    """
    shared_uri = shared_group = None
    if isinstance(store, RoutedStore):
        encoded, wrote_shared = write_incremental(
            store,
            snapshot,
            base,
            model_id=model_id,
            format=spec.format,
            max_shard_bytes=spec.max_shard_bytes,
            compression=spec.compression,
            compression_level=spec.compression_level,
        )
        shared_uri = store.shared.uri
        shared_group = model_id if wrote_shared else None
    else:
        encoded = write_state(
            store,
            snapshot.document,
            snapshot.tensors,
            format=spec.format,
            max_shard_bytes=spec.max_shard_bytes,
            compression=spec.compression,
            compression_level=spec.compression_level,
        )
    model_files = write_model_files(store, spec, model_id=model_id, run_id=run_id)
    store.flush()  # every file is in the store before the manifest commits them
    files = (*encoded.files, *model_files)
    manifest = Manifest(
        format=spec.format,
        step=step,
        epoch=epoch,
        metrics=dict(metrics or {}),
        created_at=time.time() if created_at is None else created_at,
        files=files,
        tensors=encoded.tensors,
        structure_file=STRUCTURE_FILE,
        triggers=tuple(triggers),
        versions=library_versions(),
        format_version=format_version_for(files, SINGLE_FORMAT_VERSION, spec.compression),
        compression=spec.compression,
        shared_uri=shared_uri,
        shared_group=shared_group,
    )
    if before_manifest is not None:
        before_manifest()
    write_manifest(store, manifest)
    store.flush()
    return manifest


def write_model_files(
    store: Store, spec: FolderSpec, *, model_id: str, run_id: str
) -> list[FileEntry]:
    """``code/`` (the model's code paths) and ``MLmodel``: what MLflow serves the folder by."""
    code = [f for p in spec.code_paths for f in write_code(store, Path(p))]
    mlmodel = write_file(
        store,
        "MLmodel",
        mlmodel_yaml(
            model_id=model_id,
            run_id=run_id,
            format=spec.format,
            model_factory=spec.model_factory,
            model_kwargs=spec.model_kwargs,
            with_code=bool(code),
        ),
    )
    return [*code, mlmodel]


def write_code(store: Store, source: Path) -> list[FileEntry]:
    """Copy a code path (file or package folder) under ``code/`` for the pyfunc loader."""
    if not source.exists():
        raise CheckpointError(f"code path {source} does not exist")
    files = (
        [source]
        if source.is_file()
        else sorted(p for p in source.rglob("*.py") if "__pycache__" not in p.parts)
    )
    base = source.parent
    return [
        write_file(store, f"{CODE_DIR}/{path.relative_to(base).as_posix()}", path.read_bytes())
        for path in files
    ]

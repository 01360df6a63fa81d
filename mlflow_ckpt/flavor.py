"""The ``mlflow_ckpt`` MLflow flavor: every checkpoint is also a servable pyfunc model.

Each checkpoint folder carries an ``MLmodel`` file with two flavors: ``mlflow_ckpt`` (format,
how to rebuild the network) and ``python_function`` (pointing at :func:`_load_pyfunc` here).
So ``mlflow.pyfunc.load_model(checkpoint.uri).predict(batch)`` works on any checkpoint whose
manager was given a ``model_factory``: the network is rebuilt by importing that factory and
calling it with the JSON ``model_kwargs`` recorded at save time, then ``state["model"]`` is
loaded into it. No pickled code is involved at any point.

Like MLflow's own flavor modules, this one sits above the format it serves: it holds the
quartet :func:`save_model` (a checkpoint folder at a local path), :func:`log_model` (a
checkpoint of the active run, through the manager's one write path), :func:`load_model` and
:func:`_load_pyfunc`. The folder format itself lives in :mod:`mlflow_ckpt.folder`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.artifacts import download_artifacts

from mlflow_ckpt.catalog import Checkpoint
from mlflow_ckpt.codec import Manifest, check_format
from mlflow_ckpt.errors import CheckpointError
from mlflow_ckpt.folder import (
    FLAVOR_NAME,
    MODEL_KEY,
    FolderSpec,
    factory_path,
    load_folder_model,
    write_folder,
)
from mlflow_ckpt.manager import CheckpointManager
from mlflow_ckpt.snapshot import take_snapshot
from mlflow_ckpt.storage import LocalStore

__all__ = ["FLAVOR_NAME", "load_model", "log_model", "save_model"]


def _as_state(state_or_model: Mapping[str, Any] | torch.nn.Module) -> Mapping[str, Any]:
    if isinstance(state_or_model, torch.nn.Module):
        return {MODEL_KEY: state_or_model}
    return state_or_model


def save_model(
    state_or_model: Mapping[str, Any] | torch.nn.Module,
    path: str | Path,
    *,
    model_factory: Callable[..., Any] | str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    format: str = "safetensors",
    code_paths: Sequence[str | Path] = (),
) -> Manifest:
    """Write a checkpoint folder (a loadable MLflow model) to the local ``path``.

    ``path`` must not exist yet, as with MLflow's own ``save_model`` functions.
    """
    target = Path(path)
    if target.exists():
        raise CheckpointError(f"{target} already exists; save_model writes a new folder")
    spec = FolderSpec(
        format=check_format(format),
        model_factory=factory_path(model_factory),
        model_kwargs=json.loads(json.dumps(dict(model_kwargs or {}))),
        code_paths=tuple(str(p) for p in code_paths),
    )
    snapshot = take_snapshot(_as_state(state_or_model), {"step": 0}, copy=False)
    return write_folder(
        LocalStore(str(target), target), snapshot, spec, model_id="", run_id="", step=0
    )


def log_model(
    state_or_model: Mapping[str, Any] | torch.nn.Module,
    *,
    step: int = 0,
    metrics: Mapping[str, float] | None = None,
    **manager_kwargs: Any,
) -> Checkpoint:
    """Log the state (or a bare model) as a committed checkpoint of the active run.

    The same write path as ``CheckpointManager.save`` (synchronously): the returned
    checkpoint is listed, verifiable and servable like any other.
    """
    manager = CheckpointManager(
        _as_state(state_or_model), async_save=False, save_last=False, **manager_kwargs
    )
    with manager:
        manager.save(step, metrics)
    if manager.last_checkpoint is None:  # pragma: no cover - save raises on failure
        raise CheckpointError("log_model wrote no checkpoint")
    return manager.last_checkpoint


def load_model(model_uri: str | Path) -> torch.nn.Module:
    """Rebuild the network of a checkpoint folder (local path) or any MLflow model URI.

    Every file is verified against the manifest first. For checkpoints found through the
    catalog (``models:/m-...``), :func:`mlflow_ckpt.load_model` also checks the manifest
    digest recorded at commit.
    """
    local = Path(model_uri)
    if not local.is_dir():
        local = Path(download_artifacts(artifact_uri=str(model_uri)))
    return _load_pyfunc(str(local)).model


class _CheckpointPyfunc:
    """pyfunc wrapper: eval mode, ``torch.no_grad()``, NumPy / DataFrame / dict inputs."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def get_raw_model(self) -> torch.nn.Module:
        return self.model

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        device = next(self.model.parameters(), torch.empty(0)).device
        with torch.no_grad():
            if isinstance(model_input, Mapping):
                out = self.model(**{k: _to_tensor(v, device) for k, v in model_input.items()})
            else:
                out = self.model(_to_tensor(model_input, device))
        return _to_numpy(out)


def _to_tensor(value: Any, device: torch.device) -> torch.Tensor:
    if hasattr(value, "to_numpy"):
        value = value.to_numpy()
    array = np.ascontiguousarray(value)  # DataFrames are column-major; results must not differ
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    return torch.as_tensor(array, device=device)


def _to_numpy(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.detach().cpu().numpy()
    if isinstance(out, Mapping):
        return {k: _to_numpy(v) for k, v in out.items()}
    if isinstance(out, list | tuple):
        return type(out)(_to_numpy(v) for v in out)
    return out


def _load_pyfunc(path: str) -> _CheckpointPyfunc:
    """MLflow's pyfunc entry point: ``path`` is the downloaded checkpoint folder."""
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    return _CheckpointPyfunc(load_folder_model(LocalStore(str(folder), folder), str(folder)))

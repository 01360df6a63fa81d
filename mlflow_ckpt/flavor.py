"""The ``mlflow_ckpt`` MLflow flavor: every checkpoint is also a servable pyfunc model.

Each checkpoint folder carries an ``MLmodel`` file with two flavors: ``mlflow_ckpt`` (format,
how to rebuild the network) and ``python_function`` (pointing at :func:`_load_pyfunc` here).
So ``mlflow.pyfunc.load_model(checkpoint.uri).predict(batch)`` works on any checkpoint whose
manager was given a ``model_factory``: the network is rebuilt by importing that factory and
calling it with the JSON ``model_kwargs`` recorded at save time, then ``state["model"]`` is
loaded into it. No pickled code is involved at any point.

The module follows MLflow's flavor conventions: :func:`save_model` writes a checkpoint
folder to a local path, :func:`log_model` logs one to the active run (as a checkpoint like
any other), :func:`load_model` rebuilds the network from a path or URI and
:func:`_load_pyfunc` is pyfunc's entry point. :func:`write_folder` is the one function that
lays out a checkpoint folder; the manager's save pipeline uses it too, so checkpoint bytes
are written once and never re-uploaded as pyfunc artifacts.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import safetensors
import torch

from mlflow_ckpt._version import __version__
from mlflow_ckpt.codec import (
    DEFAULT_MAX_SHARD_BYTES,
    STRUCTURE_FILE,
    FileEntry,
    Manifest,
    check_format,
    write_file,
    write_manifest,
    write_state,
)
from mlflow_ckpt.errors import CheckpointError
from mlflow_ckpt.snapshot import LoadedFolder, Snapshot, read_folder, restore, take_snapshot
from mlflow_ckpt.storage import LocalStore, Store

if TYPE_CHECKING:
    from mlflow_ckpt.catalog.checkpoint import Checkpoint

FLAVOR_NAME = "mlflow_ckpt"
MODEL_KEY = "model"
CODE_DIR = "code"


@dataclass(frozen=True)
class FolderSpec:
    """How checkpoint folders are written: format, sharding, and how to rebuild the model."""

    format: str = "safetensors"
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


def factory_path(factory: Callable[..., Any] | str | None) -> str | None:
    """Turn a module-level callable (or ``"pkg.mod:fn"``) into an import path, checking it."""
    if factory is None:
        return None
    if isinstance(factory, str):
        path = factory
    else:
        module = getattr(factory, "__module__", None)
        qualname = getattr(factory, "__qualname__", None)
        if not module or not qualname or "<" in qualname or module == "__main__":
            raise ValueError(
                f"model_factory={factory!r} must be importable: a function or class defined at "
                "module level in an importable module (not __main__, not a lambda), or a "
                "'package.module:function' string."
            )
        path = f"{module}:{qualname}"
    import_factory(path)
    return path


def import_factory(path: str) -> Callable[..., Any]:
    """Import ``"pkg.mod:qualname"``: a class or Python function of the user's own code.

    The factory is named in ``MLmodel``, i.e. in data: like MLflow's own ``loader_module``, it
    is trusted code once called. What a forged name can reach is narrowed to what a model
    factory can be: never the standard library (``os:system``, ``subprocess:run``), never a
    built-in, always a class or a plain function.
    """
    module_name, _, qualname = path.partition(":")
    top = module_name.split(".")[0]
    if not qualname or top in sys.stdlib_module_names or top == "builtins":
        raise CheckpointError(
            f"Refusing model factory {path!r}: a factory is 'package.module:callable' from "
            "your own code, never from the standard library. The MLmodel file may have been "
            "tampered with."
        )
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as exc:
        raise CheckpointError(
            f"Cannot import model factory {path!r} ({exc}); install the package that defines "
            "it or add its folder to sys.path."
        ) from exc
    if not (inspect.isclass(obj) or inspect.isfunction(obj)):
        raise CheckpointError(
            f"Refusing model factory {path!r}: it is a {type(obj).__name__}, not a class or a "
            "Python function."
        )
    return obj


def mlmodel_yaml(
    *,
    model_id: str,
    run_id: str,
    format: str,
    model_factory: str | None,
    model_kwargs: Mapping[str, Any] | None,
    with_code: bool = False,
) -> bytes:
    """The ``MLmodel`` file of a checkpoint folder."""
    from mlflow.models import Model

    model = Model(
        run_id=run_id,
        model_id=model_id,
        utc_time_created=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f"),
    )
    mlflow.pyfunc.add_to_model(
        model, loader_module="mlflow_ckpt.flavor", code=CODE_DIR if with_code else None
    )
    model.add_flavor(
        FLAVOR_NAME,
        format=format,
        manifest="manifest.json",
        model_factory=model_factory,
        model_kwargs=json.loads(json.dumps(dict(model_kwargs or {}))),
        torch_version=str(torch.__version__),
    )
    return model.to_yaml().encode()


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
) -> Manifest:
    """Write one complete checkpoint folder into ``store``; the manifest goes last.

    ``before_manifest`` runs once every other file is stored, right before the commit
    marker: the manager checks there that it still owns the run.
    """
    encoded = write_state(
        store,
        snapshot.document,
        snapshot.tensors,
        format=spec.format,
        max_shard_bytes=spec.max_shard_bytes,
    )
    code = [_write_code(store, Path(p)) for p in spec.code_paths]
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
    store.flush()  # every file is in the store before the manifest commits them
    manifest = Manifest(
        format=spec.format,
        step=step,
        epoch=epoch,
        metrics=dict(metrics or {}),
        created_at=time.time() if created_at is None else created_at,
        files=(*encoded.files, *(f for files in code for f in files), mlmodel),
        tensors=encoded.tensors,
        structure_file=STRUCTURE_FILE,
        triggers=tuple(triggers),
        versions=library_versions(),
    )
    if before_manifest is not None:
        before_manifest()
    write_manifest(store, manifest)
    store.flush()
    return manifest


def _write_code(store: Store, source: Path) -> list[FileEntry]:
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


def flavor_config(folder: Path) -> dict[str, Any]:
    """Read the ``mlflow_ckpt`` flavor section of a local checkpoint folder's MLmodel."""
    from mlflow.models import Model

    return dict(Model.load(str(folder / "MLmodel")).flavors.get(FLAVOR_NAME, {}))


def build_model(config: Mapping[str, Any], loaded: LoadedFolder, where: str) -> torch.nn.Module:
    """Rebuild ``state["model"]`` of a checkpoint with its recorded factory."""
    path = config.get("model_factory")
    if not path:
        raise CheckpointError(
            f"Checkpoint {where} has no model factory, so its network cannot be rebuilt. "
            "Pass model_factory= (and JSON model_kwargs=) to CheckpointManager, or restore "
            "into a model you build: mlflow_ckpt.load(uri, {'model': model})."
        )
    model = import_factory(path)(**dict(config.get("model_kwargs") or {}))
    if not isinstance(model, torch.nn.Module):
        raise CheckpointError(f"Model factory {path!r} returned {type(model).__name__}")
    restore(
        loaded.decoded, {MODEL_KEY: model}, strict=False, restore_rng_streams=False, where=where
    )
    return model.eval()


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
    from mlflow_ckpt.manager import CheckpointManager  # the write pipeline lives above

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

    The folder is verified against its manifest first.
    """
    local = Path(model_uri)
    if not local.is_dir():
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=str(model_uri)))
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
    with tempfile.TemporaryDirectory() as scratch:
        loaded = read_folder(LocalStore(str(folder), folder), Path(scratch), str(folder))
    return _CheckpointPyfunc(build_model(flavor_config(folder), loaded, str(folder)))

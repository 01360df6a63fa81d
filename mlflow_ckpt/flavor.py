"""The ``mlflow_ckpt`` MLflow flavor: every checkpoint is also a servable pyfunc model.

Each checkpoint folder carries an ``MLmodel`` file with two flavors: ``mlflow_ckpt`` (format,
how to rebuild the network) and ``python_function`` (pointing at :func:`_load_pyfunc` here).
So ``mlflow.pyfunc.load_model(checkpoint.uri).predict(batch)`` works on any checkpoint whose
manager was given a ``model_factory``: the network is rebuilt by importing that factory and
calling it with the JSON ``model_kwargs`` recorded at save time, then ``state["model"]`` is
loaded into it. No pickled code is involved at any point.
"""

from __future__ import annotations

import importlib
import json
import tempfile
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch

from mlflow_ckpt.errors import CheckpointError
from mlflow_ckpt.snapshot import LoadedFolder, read_folder, restore
from mlflow_ckpt.storage import LocalStore

FLAVOR_NAME = "mlflow_ckpt"
MODEL_KEY = "model"


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
    """Import ``"pkg.mod:qualname"``."""
    module_name, _, qualname = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as exc:
        raise CheckpointError(
            f"Cannot import model factory {path!r} ({exc}); install the package that defines "
            "it or add its folder to sys.path."
        ) from exc
    if not callable(obj):
        raise CheckpointError(f"Model factory {path!r} is not callable")
    return obj


def mlmodel_yaml(
    *,
    model_id: str,
    run_id: str,
    format: str,
    model_factory: str | None,
    model_kwargs: Mapping[str, Any] | None,
) -> bytes:
    """The ``MLmodel`` file of a checkpoint folder."""
    from mlflow.models import Model

    model = Model(
        run_id=run_id,
        model_id=model_id,
        utc_time_created=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f"),
    )
    mlflow.pyfunc.add_to_model(model, loader_module="mlflow_ckpt.flavor")
    model.add_flavor(
        FLAVOR_NAME,
        format=format,
        manifest="manifest.json",
        model_factory=model_factory,
        model_kwargs=json.loads(json.dumps(dict(model_kwargs or {}))),
        torch_version=str(torch.__version__),
    )
    return model.to_yaml().encode()


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

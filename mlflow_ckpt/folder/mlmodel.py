"""The ``MLmodel`` file that makes every checkpoint folder a servable MLflow model.

It names two flavors: ``mlflow_ckpt`` (tensor format, model factory and its JSON kwargs) and
``python_function``, whose loader module is :mod:`mlflow_ckpt.flavor` (named as a string:
the flavor module sits above this layer and is only imported by MLflow when serving).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import mlflow
import torch

FLAVOR_NAME = "mlflow_ckpt"
PYFUNC_LOADER = "mlflow_ckpt.flavor"
MODEL_KEY = "model"  # the state entry the pyfunc flavor rebuilds and serves
CODE_DIR = "code"  # code_paths are copied here, MLflow's convention


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
        model, loader_module=PYFUNC_LOADER, code=CODE_DIR if with_code else None
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


def flavor_config(mlmodel: Path) -> dict[str, Any]:
    """The ``mlflow_ckpt`` flavor section of an ``MLmodel`` file (or of the folder holding it)."""
    from mlflow.models import Model

    path = mlmodel / "MLmodel" if mlmodel.is_dir() else mlmodel
    return dict(Model.load(str(path)).flavors.get(FLAVOR_NAME, {}))

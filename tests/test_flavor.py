"""Each checkpoint is also a pyfunc model and can rebuild its network via model_factory."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch

import mlflow_ckpt
from tests.train_script import DIM, Net


def test_pyfunc_predicts_like_the_model_and_load_model_rebuilds_it(tracking: str) -> None:
    torch.manual_seed(0)
    model = Net()
    with mlflow.start_run(run_name="f") as run:
        with mlflow_ckpt.CheckpointManager(
            {"model": model}, model_factory=Net, async_save=False
        ) as mgr:
            mgr.save(0)
    ckpt = mlflow_ckpt.latest_checkpoint(run.info.run_id)
    batch = np.random.default_rng(0).normal(size=(5, DIM)).astype(np.float32)
    model.eval()
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    served = mlflow.pyfunc.load_model(ckpt.uri).predict(batch)
    np.testing.assert_array_equal(served, expected)
    rebuilt = mlflow_ckpt.load_model(ckpt.uri)
    assert isinstance(rebuilt, Net) and not rebuilt.training
    with torch.no_grad():
        np.testing.assert_array_equal(rebuilt(torch.from_numpy(batch)).numpy(), expected)


def test_load_model_without_factory_explains_the_fix(tracking: str) -> None:
    with mlflow.start_run(run_name="f") as run:
        with mlflow_ckpt.CheckpointManager({"model": Net()}, async_save=False) as mgr:
            mgr.save(0)
    ckpt = mlflow_ckpt.latest_checkpoint(run.info.run_id)
    with pytest.raises(mlflow_ckpt.CheckpointError, match="model_factory="):
        mlflow_ckpt.load_model(ckpt)

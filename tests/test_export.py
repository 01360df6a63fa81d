"""ONNX export checked by onnx.checker and onnx.reference; safetensors export; diff."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import onnx
import pytest
import torch
from onnx.reference import ReferenceEvaluator
from safetensors.torch import load_file

import mlflow_ckpt
from mlflow_ckpt.catalog import diff_checkpoints, export_safetensors
from tests.train_script import DIM, Net


@pytest.fixture
def ckpts(tracking: str) -> list[mlflow_ckpt.Checkpoint]:
    torch.manual_seed(0)
    model = Net()
    with mlflow.start_run(run_name="x") as run:
        with mlflow_ckpt.CheckpointManager(
            {"model": model}, model_factory=Net, async_save=False
        ) as mgr:
            mgr.save(0)
            with torch.no_grad():
                model.body[0].weight.add_(0.5)
            mgr.save(1)
    return mlflow_ckpt.list_checkpoints(run.info.run_id)


@pytest.mark.slow
def test_onnx_export_matches_torch(ckpts: list, tmp_path: Path) -> None:
    example = torch.randn(2, DIM)
    target = mlflow_ckpt.export_onnx(ckpts[0], example, tmp_path / "m.onnx")
    proto = onnx.load(target)
    onnx.checker.check_model(proto)
    batch = np.random.default_rng(0).normal(size=(5, DIM)).astype(np.float32)  # other batch size
    got = ReferenceEvaluator(proto).run(None, {proto.graph.input[0].name: batch})[0]
    model = mlflow_ckpt.load_model(ckpts[0])
    with torch.no_grad():
        np.testing.assert_allclose(got, model(torch.from_numpy(batch)).numpy(), atol=1e-5)
    # without a path it goes next to the checkpoint
    beside = mlflow_ckpt.export_onnx(ckpts[0].uri, example)
    assert Path(beside).exists() and Path(beside).parent.parent == Path(ckpts[0].artifact_location)


def test_safetensors_export_is_a_standard_file(ckpts: list, tmp_path: Path) -> None:
    path = export_safetensors(ckpts[0], tmp_path / "weights.safetensors")
    tensors = load_file(path)
    model = Net()
    model.load_state_dict(tensors)
    assert set(tensors) == set(Net().state_dict())


def test_diff_reports_changed_tensors(ckpts: list) -> None:
    rows = {r["name"]: r for r in diff_checkpoints(ckpts[1], ckpts[0])}
    assert rows["model.body.0.weight"]["status"] == "changed"
    assert rows["model.body.0.weight"]["max_abs_diff"] == pytest.approx(0.5)
    assert rows["model.body.3.weight"]["status"] == "same"
    assert rows["model.body.3.weight"]["max_abs_diff"] == 0.0

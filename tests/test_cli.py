"""The mlflow-ckpt command line, through click's runner and as an installed script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import mlflow_ckpt
from mlflow_ckpt.cli import main
from tests.train_script import Net


@pytest.fixture
def run_id(tracking: str) -> str:
    torch.manual_seed(0)
    model = Net()
    with mlflow.start_run(run_name="cli") as run:
        with mlflow_ckpt.CheckpointManager(
            {"model": model}, model_factory=Net, async_save=False
        ) as mgr:
            for s, loss in enumerate([3.0, 1.0, 2.0, 4.0]):
                with torch.no_grad():
                    model.body[0].bias.add_(1.0)
                mgr.save(s, {"val_loss": loss})
    return run.info.run_id


def cli(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.output


def test_list_table_and_json(run_id: str) -> None:
    out = cli("list", run_id)
    assert out.splitlines()[0].split()[:4] == ["step", "epoch", "trigger", "metrics"]
    assert "val_loss=4" in out and out.count("models:/m-") == 4
    records = json.loads(cli("list", run_id, "--json"))
    assert [r["step"] for r in records] == [3, 2, 1, 0]
    assert records[0]["metrics"] == {"val_loss": 4.0}


def test_show(run_id: str) -> None:
    uri = mlflow_ckpt.latest_checkpoint(run_id).uri
    out = cli("show", uri)
    assert "state.json" in out and "MLmodel" in out and "step: 3" in out
    data = json.loads(cli("show", uri, "--json"))
    assert data["step"] == 3 and data["tensors"] == 6  # 4 weights + 2 RNG states


def test_verify_ok_and_corrupt_names_each_bad_file(run_id: str) -> None:
    assert "all 4 checkpoint(s) verified" in cli("verify", run_id)
    newest = mlflow_ckpt.latest_checkpoint(run_id)
    folder = Path(newest.artifact_location)
    (shard,) = folder.glob("tensors-*")
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    (folder / "MLmodel").write_text("tampered")
    out = cli("verify", run_id, code=1)
    assert f"CORRUPT {newest.model_id}" in out
    assert shard.name in out and "MLmodel" in out
    assert "1 of 4 checkpoint(s) corrupt" in out
    cli("verify", newest.uri, code=1)
    older = mlflow_ckpt.list_checkpoints(run_id)[1]
    assert "all 1 checkpoint(s) verified" in cli("verify", older.uri)


def test_gc_dry_run_then_real(run_id: str) -> None:
    out = cli(
        "gc", run_id, "--keep-last", "1", "--keep-best", "1", "--metric", "val_loss", "--dry-run"
    )
    assert out.count("would delete step") == 2 and "kept 2, would delete 2" in out
    assert len(mlflow_ckpt.list_checkpoints(run_id)) == 4
    cli("gc", run_id, "--keep-last", "1", "--keep-best", "1", "--metric", "val_loss")
    assert sorted(c.step for c in mlflow_ckpt.list_checkpoints(run_id)) == [1, 3]
    err = CliRunner().invoke(main, ["gc", run_id, "--keep-best", "1"])
    assert err.exit_code == 2 and "--metric" in err.output


def test_best_promote_export_diff(run_id: str, tmp_path: Path) -> None:
    best = json.loads(cli("best", "--experiment", "tests", "--metric", "val_loss", "--json"))
    assert best["step"] == 1 and best["run_id"] == run_id
    out = cli("promote", best["uri"], "--name", "clf", "--alias", "prod")
    assert "models:/clf@prod" in out
    assert mlflow_ckpt.load("models:/clf@prod", {"model": Net()}).step == 1
    target = tmp_path / "w.safetensors"
    cli("export", best["uri"], "--format", "safetensors", "-o", str(target))
    assert set(load_file(str(target))) == set(Net().state_dict())
    newest = mlflow_ckpt.latest_checkpoint(run_id).uri
    out = cli("diff", best["uri"], newest)
    assert "model.body.0.bias  changed  2" in out
    assert "model.body.3.weight" not in out  # unchanged tensors only with --all
    assert "model.body.3.weight" in cli("diff", best["uri"], newest, "--all")


def test_errors_are_one_line_messages(tracking: str) -> None:
    result = CliRunner().invoke(main, ["list", "0" * 32])
    assert result.exit_code == 1 and "No MLflow run" in result.output
    assert "Traceback" not in result.output


def test_installed_script_honours_mlflow_tracking_uri(run_id: str, tracking: str) -> None:
    script = shutil.which("mlflow-ckpt") or str(Path(os.sys.executable).parent / "mlflow-ckpt")
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking)
    out = subprocess.run(
        [script, "list", run_id, "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    assert len(json.loads(out)) == 4

"""Verify after save: sizes through the store's listing (every store), a re-hash, or the
user's validation on a model rebuilt from the stored checkpoint."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

import mlflow_ckpt
from mlflow_ckpt.catalog import tags
from mlflow_ckpt.cli import main as cli
from mlflow_ckpt.codec import check_sizes, read_manifest
from mlflow_ckpt.storage import open_store
from tests.conftest import StoreUnderTest
from tests.train_script import DIM, Net


def test_sizes_are_checked_through_every_stores_listing(store: StoreUnderTest) -> None:
    with mlflow.start_run(run_name=f"size-{store.name}") as run:
        with mlflow_ckpt.CheckpointManager(
            {"model": Net(), "w": torch.randn(1000)}, async_save=False, code_paths=[__file__]
        ) as mgr:
            mgr.save(0)  # verify="size" (the default) passed: the commit happened
    (ckpt,) = mlflow_ckpt.list_checkpoints(run.info.run_id)
    with open_store(ckpt.artifact_location) as folder, tempfile.TemporaryDirectory() as scratch:
        manifest = read_manifest(folder, Path(scratch), "test")
        assert any("/" in f.path for f in manifest.files)  # code/ is listed per folder too
        check_sizes(folder, manifest, "test")
        victim = next(f for f in manifest.files if f.path.startswith("tensors-"))
        folder.write_bytes(victim.path, b"short")  # the store now holds another size
        folder.flush()
        with pytest.raises(mlflow_ckpt.CheckpointCorruptedError, match=victim.path) as info:
            check_sizes(folder, manifest, "test")
        assert info.value.path == victim.path and "5 bytes" in str(info.value)


class Threshold:
    """A user's validation: the rebuilt model's output on a fixed batch must stay small."""

    def __init__(self) -> None:
        self.calls = 0
        self.batch = torch.ones(2, DIM)

    def __call__(self, model: torch.nn.Module) -> bool:
        self.calls += 1
        assert not model.training  # rebuilt in eval mode, not the live training model
        return bool(model(self.batch).abs().max() < 5.0)


@pytest.mark.parametrize("async_save", [True, False])
def test_a_checkpoint_failing_validation_is_invalid_never_listed_and_gc_removes_it(
    tracking: str, async_save: bool
) -> None:
    model = Net()
    validate = Threshold()
    with mlflow.start_run(run_name="validate") as run:
        mgr = mlflow_ckpt.CheckpointManager(
            {"model": model},
            model_factory=Net,
            verify=validate,
            async_save=async_save,
            on_error="warn",
            save_last=False,
        )
        mgr.save(0, {"loss": 1.0})
        mgr.wait()
        with torch.no_grad():
            model.body[-1].bias.fill_(100.0)  # the next checkpoint's model is off the rails
        with pytest.warns(UserWarning, match="failed verification after the save"):
            mgr.save(1, {"loss": 2.0})
            mgr.wait()
        mgr.close()
    run_id = run.info.run_id
    assert validate.calls == 2
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run_id)] == [0]
    client = MlflowClient()
    invalid = [
        m
        for m in client.search_logged_models([run.info.experiment_id])
        if m.tags[tags.STATUS] == tags.INVALID
    ]
    assert [m.tags[tags.STEP] for m in invalid] == ["1"]
    assert "Threshold(model) returned False" in invalid[0].tags[tags.INVALID_REASON]
    with pytest.raises(mlflow_ckpt.CheckpointNotFoundError, match="failed verification"):
        mlflow_ckpt.load(f"models:/{invalid[0].model_id}", {"model": Net()})
    # resume ignores it; the step's metrics still reached the run's history
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [0, 1]
    resumed = mlflow_ckpt.CheckpointManager.resume(run_id, {"model": Net()})
    assert resumed.start_step == 1
    resumed.close()
    mlflow.end_run()
    # gc removes what verification refused: files first, then the LoggedModel
    result = CliRunner().invoke(cli, ["gc", run_id])
    assert result.exit_code == 0 and "1 failed save(s) removed" in result.output, result.output
    assert not Path(invalid[0].artifact_location).exists()
    assert invalid[0].model_id not in {
        m.model_id for m in client.search_logged_models([run.info.experiment_id])
    }


def test_on_error_raise_stops_on_a_failed_validation(tracking: str) -> None:
    with mlflow.start_run(run_name="raise"):
        mgr = mlflow_ckpt.CheckpointManager(
            {"model": Net()}, model_factory=Net, verify=lambda model: False, async_save=False
        )
        with pytest.raises(mlflow_ckpt.CheckpointWriteError, match="returned False"):
            mgr.save(0)
        mgr.close()  # save_last is not retried for a step that was written and refused


def test_a_validation_score_is_logged_and_linked_to_the_checkpoint(tracking: str) -> None:
    def accuracy(model: torch.nn.Module) -> float:
        return 0.75

    with mlflow.start_run(run_name="score") as run:
        with mlflow_ckpt.CheckpointManager(
            {"model": Net()}, model_factory=Net, verify=accuracy, async_save=False
        ) as mgr:
            mgr.save(0, {"loss": 1.0})
    (ckpt,) = mlflow_ckpt.list_checkpoints(run.info.run_id)
    assert ckpt.metrics == {"loss": 1.0, "verify_score": 0.75}
    history = MlflowClient().get_metric_history(run.info.run_id, "verify_score")
    assert [(m.step, m.value) for m in history] == [(0, 0.75)]


def test_hash_mode_rereads_the_stored_files(tracking: str) -> None:
    with mlflow.start_run(run_name="hash") as run:
        with mlflow_ckpt.CheckpointManager(
            {"w": torch.randn(10_000)}, verify="hash", async_save=True
        ) as mgr:
            mgr.save(0)
    (ckpt,) = mlflow_ckpt.list_checkpoints(run.info.run_id)
    manifest = json.loads((Path(ckpt.artifact_location) / "manifest.json").read_text())
    assert manifest["files"]


def test_verify_option_is_checked(tracking: str) -> None:
    with mlflow.start_run(run_name="opt"):
        with pytest.raises(ValueError, match="verify must be 'size', 'hash' or a callable"):
            mlflow_ckpt.CheckpointManager({"w": torch.zeros(1)}, verify="md5")
        with pytest.raises(ValueError, match="pass model_factory="):
            mlflow_ckpt.CheckpointManager({"w": torch.zeros(1)}, verify=lambda m: True)
        with pytest.raises(ValueError, match="the state has no 'model' entry"):
            mlflow_ckpt.CheckpointManager({"net": Net()}, model_factory=Net, verify=bool)


_KILLED_IN_VALIDATION = """
import os, sys, time
import mlflow, torch
import mlflow_ckpt
from tests.train_script import Net


def validate(model):
    print("validating", flush=True)
    time.sleep(60)  # killed here
    return False


with mlflow.start_run(run_name="killed") as run:
    print(run.info.run_id, flush=True)
    mgr = mlflow_ckpt.CheckpointManager(
        {"model": Net()}, model_factory=Net, verify=validate, async_save=False
    )
    mgr.save(0)
"""


def test_a_save_killed_during_validation_is_never_resumed_from(
    tracking: str, tmp_path: Path
) -> None:
    """The manifest is complete but the check never finished: recovery must not adopt it."""
    import os
    import signal
    import subprocess
    import sys

    script = tmp_path / "killed.py"
    script.write_text(_KILLED_IN_VALIDATION)
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root))
    child = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path
    )
    assert child.stdout is not None
    run_id = child.stdout.readline().strip()
    assert child.stdout.readline().strip() == "validating"
    child.send_signal(signal.SIGKILL)
    child.wait()
    pending = MlflowClient().search_logged_models(
        [mlflow.get_experiment_by_name("tests").experiment_id]
    )
    assert [m.tags[tags.VALIDATION] for m in pending] == ["pending"]
    resumed = mlflow_ckpt.CheckpointManager.resume(run_id, {"model": Net()})
    assert resumed.resumed_from is None and resumed.start_step == 0
    resumed.close()
    mlflow.end_run()
    assert mlflow_ckpt.list_checkpoints(run_id) == []
    assert not Path(pending[0].artifact_location).exists()  # discarded: files, then model

"""The artifact store's disk fills up mid-save: a clear error, nothing partial, training goes on.

The store is a real 8 MiB tmpfs (``mount -t tmpfs``, which needs root: CI runs as root). A
filler file leaves less room than one checkpoint needs, so the save really hits ENOSPC in
the middle of writing its files.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

import mlflow_ckpt
from mlflow_ckpt.storage.local import TEMP_MARKER
from tests import tinydisk

MB = 1 << 20


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs mounted under ``tmp_path``."""
    try:
        with tinydisk.tmpfs(tmp_path / "tiny") as mount:
            yield mount
    except RuntimeError as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("on_error", ["raise", "warn"])
def test_full_disk_fails_cleanly_and_training_goes_on(
    tracking: str, tiny_disk: Path, on_error: str, async_save: bool
) -> None:
    exp = mlflow.create_experiment("tiny-disk", artifact_location=str(tiny_disk / "artifacts"))
    state = tinydisk.training_state()
    with mlflow.start_run(experiment_id=exp) as run:
        mgr = mlflow_ckpt.CheckpointManager(
            state, save_every_n_steps=1, keep_last_n=1, on_error=on_error, async_save=async_save
        )
        mgr.step(0, {"loss": 1.0})
        mgr.wait()
        first = mlflow_ckpt.latest_checkpoint(run.info.run_id)
        assert first is not None and first.step == 0
        before = tinydisk.files(tiny_disk)
        filler = tinydisk.fill(tiny_disk, leave=1 * MB)  # a checkpoint needs ~3 MiB

        # Step 1 cannot be stored. With "raise" the error surfaces at once (sync) or at the
        # manager's next call (async); with "warn" it is a warning and the loop goes on.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                mgr.step(1, {"loss": 0.9})
                mgr.wait()
                error: Exception | None = None
            except mlflow_ckpt.CheckpointWriteError as exc:
                error = exc
        if on_error == "raise":
            assert error is not None
            message = str(error)
        else:
            assert error is None
            message = " ".join(str(w.message) for w in caught)
        assert "no space left on device" in message
        assert "step 1" in message and run.info.run_id in message
        assert "the checkpoint of step 0 is still intact" in message

        # Nothing partial remains; the previous checkpoint still verifies and loads.
        assert tinydisk.files(tiny_disk) == before
        assert not any(TEMP_MARKER in p.name for p in tiny_disk.rglob("*"))
        assert [c.step for c in mlflow_ckpt.list_checkpoints(run.info.run_id)] == [0]
        fresh = tinydisk.training_state()
        with torch.no_grad():
            fresh["model"].weight.zero_()
        mlflow_ckpt.load(first, fresh)
        assert torch.equal(fresh["model"].weight, state["model"].weight)

        # Space comes back: training goes on and the next save commits.
        filler.unlink()
        mgr.step(2, {"loss": 0.8})
        mgr.close()
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run.info.run_id)] == [2]
    # the failed step's metrics still reached the run's history, once
    history = MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == [0, 1, 2]
    statuses = {
        m.tags["mlflow_ckpt.step"]: m.tags["mlflow_ckpt.status"]
        for m in MlflowClient().search_logged_models([exp])
    }
    # step 0 went to retention; the failed step 1 left no LoggedModel ("Failed" row) behind
    assert statuses == {"2": "committed"}

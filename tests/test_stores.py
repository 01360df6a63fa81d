"""The whole checkpoint cycle on every store: local, S3, Azure Blob, GCS, mlflow server proxy.

Each store is a real server on 127.0.0.1 speaking its protocol (moto, Azurite,
fake-gcs-server, ``mlflow server --serve-artifacts``); nothing in an SDK is patched.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

import mlflow_ckpt
from tests.conftest import StoreUnderTest
from tests.test_resume_bitwise import STEPS, _assert_same, die_then_resume
from tests.train_script import DIM, Net

VALUES = [5.0, 1.0, 4.0, 3.0, 6.0, 2.0, 7.0, 8.0]


@pytest.mark.slow
def test_full_cycle(store: StoreUnderTest, run_child, tmp_path: Path, straight_state: Path) -> None:
    # --- async saves with best + periodic triggers and retention
    torch.manual_seed(0)
    model = Net()
    with mlflow.start_run(run_name="async") as run:
        with mlflow_ckpt.CheckpointManager(
            {"model": model},
            save_every_n_steps=2,
            monitor="val_loss",
            keep_last_n=2,
            keep_best_n=1,
            model_factory=Net,
        ) as mgr:
            for step, value in enumerate(VALUES):
                with torch.no_grad():
                    model.body[0].bias.add_(1.0)
                mgr.step(step, {"val_loss": value})
    run_id = run.info.run_id
    ckpts = mlflow_ckpt.list_checkpoints(run_id)
    assert [c.step for c in ckpts] == [7, 5, 1]
    best = mlflow_ckpt.best_checkpoint(run_id=run_id, metric="val_loss")
    assert best.step == 1
    # retention deleted the bytes: the store's own client sees only the kept checkpoints
    assert store.model_ids_with_files() == {c.model_id for c in ckpts}
    assert any(k.endswith("manifest.json") for k in store.list_keys())

    # --- a sync save loads back exactly
    fresh = Net()
    with mlflow.start_run(run_name="sync") as sync_run:
        with mlflow_ckpt.CheckpointManager({"model": model}, async_save=False) as mgr:
            mgr.save(0)
    mlflow_ckpt.load(mlflow_ckpt.latest_checkpoint(sync_run.info.run_id), {"model": fresh})
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)

    # --- promote the best and serve it through pyfunc by alias
    mlflow_ckpt.promote(best, f"clf-{store.name}", alias="champion")
    batch = np.random.default_rng(0).normal(size=(3, DIM)).astype(np.float32)
    served = mlflow.pyfunc.load_model(f"models:/clf-{store.name}@champion").predict(batch)
    direct = mlflow.pyfunc.load_model(best.uri).predict(batch)
    np.testing.assert_array_equal(served, direct)

    # --- kill mid-run, resume by run ID in a new process: bit-for-bit
    run_id, resumed, _ = die_then_resume(run_child, tmp_path)
    _assert_same(straight_state, resumed)
    assert mlflow_ckpt.latest_checkpoint(run_id).step == STEPS - 1


def test_saves_leave_the_global_random_stream_alone(store: StoreUnderTest) -> None:
    """Background uploads must not draw from Python's global random (GCS's SDK would)."""
    import random

    random.seed(5)
    state = random.getstate()
    with mlflow.start_run(run_name="rng"):
        with mlflow_ckpt.CheckpointManager({"w": torch.zeros(10)}, save_every_n_steps=1) as mgr:
            for step in range(3):
                mgr.step(step, {"loss": 1.0})
            mgr.wait()
            assert random.getstate() == state


def test_large_files_go_up_in_parts_from_memory_and_aborted_ones_leave_nothing(
    store: StoreUnderTest,
) -> None:
    """With 5 MiB parts, a 23 MiB shard goes up as S3 multipart parts, Azure blocks, GCS
    resumable chunks or one chunked PUT to the proxy; it loads back bit for bit. A file whose
    writer fails halfway (after two parts were sent) never appears in the store."""
    from mlflow_ckpt.storage import TransferConfig, open_store

    transfer = TransferConfig(
        max_workers=2, part_bytes=5 * 1024 * 1024, single_put_bytes=5 * 1024 * 1024
    )
    state = {"big": torch.randn(23 * 1024 * 1024 // 4 + 3), "small": torch.arange(7)}
    with mlflow.start_run(run_name="parts") as run:
        with mlflow_ckpt.CheckpointManager(state, async_save=False, transfer=transfer) as mgr:
            mgr.save(1)
    ckpt = mlflow_ckpt.latest_checkpoint(run.info.run_id)
    restored = {"big": torch.zeros_like(state["big"]), "small": torch.zeros(7, dtype=torch.int64)}
    mlflow_ckpt.load(ckpt, restored)
    assert torch.equal(restored["big"], state["big"])
    assert torch.equal(restored["small"], state["small"])

    root = mlflow.get_experiment(store.experiment_id).artifact_location
    with open_store(f"{root}/abort-probe", transfer) as raw:
        if store.name != "local":  # written from memory by the store's own sink, never staged
            assert raw._sink("", "probe.bin") is not None  # type: ignore[attr-defined]
        with pytest.raises(RuntimeError, match="encoder failed"), raw.open_writer("x.bin") as f:
            f.write(b"\x01" * (12 * 1024 * 1024))
            raise RuntimeError("encoder failed")
        raw.flush()
        assert not raw.exists("x.bin")
        assert not [k for k in store.list_keys() if "abort-probe" in k]


def test_a_file_up_to_single_put_bytes_is_one_request_and_larger_ones_start_with_it(
    store: StoreUnderTest, tmp_path: Path
) -> None:
    """With parts of 5 MiB and single requests up to 10 MiB, a 9 MiB file is gathered and sent
    whole; a 17 MiB file goes as a 10 MiB first part and 5 MiB parts. Both read back."""
    from mlflow_ckpt.storage import TransferConfig, open_store

    mib = 1024 * 1024
    transfer = TransferConfig(max_workers=2, part_bytes=5 * mib, single_put_bytes=10 * mib)
    root = mlflow.get_experiment(store.experiment_id).artifact_location
    blobs = {"small.bin": bytes(range(256)) * (9 * mib // 256), "big.bin": b"\x07" * (17 * mib)}
    with open_store(f"{root}/single-put", transfer) as raw:
        for name, data in blobs.items():
            with raw.open_writer(name) as f:
                for start in range(0, len(data), 3 * mib):  # writes that straddle parts
                    f.write(data[start : start + 3 * mib])
        raw.flush()
        assert raw.list_sizes("") == {name: len(data) for name, data in blobs.items()}
        for name, data in blobs.items():
            assert raw.read_bytes(name, tmp_path) == data

"""Triggers, metric logging, async behaviour and the MLflow records a manager leaves."""

from __future__ import annotations

import random
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

import mlflow_ckpt


def small_state() -> dict:
    model = torch.nn.Linear(3, 2)
    return {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}


def saved_steps(run_id: str) -> list[int]:
    return sorted(c.step for c in mlflow_ckpt.list_checkpoints(run_id))


@pytest.mark.parametrize("async_save", [True, False])
def test_every_n_steps_saves_after_steps_n_minus_1_and_last_on_close(
    tracking: str, async_save: bool
) -> None:
    with mlflow.start_run(run_name="p") as run:
        mgr = mlflow_ckpt.CheckpointManager(
            small_state(), save_every_n_steps=4, async_save=async_save
        )
        fired = [mgr.step(s, {"loss": float(s)}) for s in range(10)]
        mgr.close()
    assert [s for s, f in enumerate(fired) if f] == [3, 7]
    ckpts = mlflow_ckpt.list_checkpoints(run.info.run_id)
    assert [(c.step, c.triggers) for c in ckpts] == [
        (9, ("last",)),
        (7, ("periodic",)),
        (3, ("periodic",)),
    ]
    assert ckpts[0].metrics == {"loss": 9.0}  # the last step's metrics are linked too


def test_no_last_save_when_final_step_already_saved(tracking: str) -> None:
    with mlflow.start_run(run_name="p") as run:
        with mlflow_ckpt.CheckpointManager(small_state(), save_every_n_steps=5) as mgr:
            for s in range(10):
                mgr.step(s)
    assert saved_steps(run.info.run_id) == [4, 9]


def test_save_last_false(tracking: str) -> None:
    with mlflow.start_run(run_name="p") as run:
        with mlflow_ckpt.CheckpointManager(small_state(), save_last=False) as mgr:
            for s in range(3):
                mgr.step(s)
    assert saved_steps(run.info.run_id) == []


def test_every_n_epochs_on_epoch_ends(tracking: str) -> None:
    with mlflow.start_run(run_name="e") as run:
        with mlflow_ckpt.CheckpointManager(
            small_state(), save_every_n_epochs=2, save_last=False
        ) as mgr:
            for s in range(12):  # 3 steps per epoch: epochs 0..3
                mgr.step(s, epoch=s // 3, end_of_epoch=s % 3 == 2)
    ckpts = mlflow_ckpt.list_checkpoints(run.info.run_id)
    assert [(c.step, c.epoch, c.triggers) for c in ckpts] == [
        (11, 3, ("epoch",)),
        (5, 1, ("epoch",)),
    ]


def test_every_n_seconds(tracking: str) -> None:
    # The interval counts from the start of the last save; async, step(2) returns as soon as
    # the write is queued, so step(3) comes well within 0.5 s however loaded the machine is
    # (a sync save took over 0.5 s here with other tests running beside it).
    with mlflow.start_run(run_name="t") as run:
        with mlflow_ckpt.CheckpointManager(
            small_state(), save_every_n_seconds=0.5, save_last=False, async_save=True
        ) as mgr:
            assert not mgr.step(0)
            assert not mgr.step(1)
            time.sleep(0.6)
            assert mgr.step(2)
            assert not mgr.step(3)
            time.sleep(0.6)
            assert mgr.step(4)
    assert saved_steps(run.info.run_id) == [2, 4]


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [
        ("min", [3.0, 2.0, 2.5, float("nan"), 1.0, float("inf"), 1.0], [0, 1, 4]),
        ("max", [0.1, 0.3, 0.2, float("nan"), 0.4, float("-inf"), 0.5], [0, 1, 4, 6]),
    ],
)
def test_best_metric_saves_on_improvement_only(
    tracking: str, mode: str, values: list[float], expected: list[int]
) -> None:
    with mlflow.start_run(run_name="b") as run:
        with mlflow_ckpt.CheckpointManager(
            small_state(), monitor="val", mode=mode, save_last=False
        ) as mgr:
            for s, v in enumerate(values):
                mgr.step(s, {"val": v})
            best = mgr.best_value
    assert saved_steps(run.info.run_id) == expected
    assert best == values[expected[-1]]
    chosen = mlflow_ckpt.best_checkpoint(run_id=run.info.run_id, metric="val", mode=mode)
    assert chosen.step == expected[-1]


def test_triggers_firing_together_make_one_checkpoint(tracking: str) -> None:
    with mlflow.start_run(run_name="b") as run:
        with mlflow_ckpt.CheckpointManager(
            small_state(), save_every_n_steps=2, monitor="val", save_last=False
        ) as mgr:
            for s, v in enumerate([5.0, 4.0, 6.0, 7.0]):
                mgr.step(s, {"val": v})
    ckpts = mlflow_ckpt.list_checkpoints(run.info.run_id)
    assert [(c.step, c.triggers) for c in ckpts] == [
        (3, ("periodic",)),
        (1, ("periodic", "best")),
        (0, ("best",)),
    ]


def test_each_step_logged_once_and_checkpoint_metrics_linked(tracking: str) -> None:
    with mlflow.start_run(run_name="m") as run:
        with mlflow_ckpt.CheckpointManager(small_state(), save_every_n_steps=3) as mgr:
            for s in range(7):
                mgr.step(s, {"loss": 10.0 - s, "acc": torch.tensor(s / 10)})
            mgr.save(7, {"loss": 1.5})
    client = MlflowClient()
    for key, n in (("loss", 8), ("acc", 7)):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(range(n))
    ckpt = {c.step: c for c in mlflow_ckpt.list_checkpoints(run.info.run_id)}
    assert set(ckpt) == {2, 5, 7}
    assert ckpt[5].metrics == {"loss": 5.0, "acc": pytest.approx(0.5)}
    model = client.get_logged_model(ckpt[5].model_id)
    assert {(m.key, m.step) for m in model.metrics} == {("loss", 5), ("acc", 5)}
    assert model.tags["mlflow_ckpt.step"] == "5"
    assert model.tags["mlflow_ckpt.trigger"] == "periodic"
    assert model.tags["mlflow_ckpt.status"] == "committed"
    assert model.source_run_id == run.info.run_id
    outputs = client.get_run(run.info.run_id).outputs.model_outputs
    assert {(o.model_id, o.step) for o in outputs} == {(c.model_id, c.step) for c in ckpt.values()}


def test_manager_calls_leave_global_random_streams_alone(tracking: str) -> None:
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    state = small_state()
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    with mlflow.start_run(run_name="rng"):
        with mlflow_ckpt.CheckpointManager(state, async_save=False) as mgr:
            for s in range(3):
                mgr.step(s, {"loss": 1.0})
                mgr.save(s)
    assert random.getstate() == before[0]
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(torch.get_rng_state(), before[2])


def test_async_next_save_waits_for_previous_commit(tracking: str) -> None:
    state = {"big": torch.randn(2_000_000)}
    with mlflow.start_run(run_name="a") as run:
        with mlflow_ckpt.CheckpointManager(state) as mgr:
            mgr.save(0)
            assert mgr._saver.worker.saves_in_flight <= 1
            mgr.save(1)  # returns only after step 0 is committed
            assert saved_steps(run.info.run_id) in ([0], [0, 1])
            assert mgr._saver.worker.saves_in_flight <= 1
            mgr.wait()
            assert saved_steps(run.info.run_id) == [0, 1]


def test_async_snapshot_is_isolated_from_later_training(tracking: str) -> None:
    weights = torch.zeros(1_000_000)
    with mlflow.start_run(run_name="a") as run:
        with mlflow_ckpt.CheckpointManager({"w": weights}) as mgr:
            mgr.save(0)
            weights.add_(1.0)  # training continues while the save is in flight
    restored = {"w": torch.empty(1_000_000)}
    ckpt = mlflow_ckpt.list_checkpoints(run.info.run_id)[-1]
    mlflow_ckpt.load(ckpt, restored)
    assert ckpt.step == 0 and torch.count_nonzero(restored["w"]) == 0


def _broken_experiment(tmp_path: Path) -> str:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the artifact folder should be")
    return mlflow.create_experiment("broken", artifact_location=str(blocker / "artifacts"))


def test_async_error_is_raised_on_next_call_and_nothing_is_listed(
    tracking: str, tmp_path: Path
) -> None:
    exp = _broken_experiment(tmp_path)
    with mlflow.start_run(run_name="e", experiment_id=exp) as run:
        mgr = mlflow_ckpt.CheckpointManager(small_state(), save_every_n_steps=1)
        mgr.step(0)  # the failure happens in the background
        with pytest.raises(mlflow_ckpt.CheckpointWriteError) as info:
            mgr.wait()
        with pytest.raises(mlflow_ckpt.CheckpointWriteError):
            mgr.close()  # save_last tries the unsaved step 0 once more
    message = str(info.value)
    assert run.info.run_id in message and "step 0" in message and "not-a-dir" in message
    assert mlflow_ckpt.list_checkpoints(run.info.run_id) == []
    # Both failed saves are gone from MLflow too: no "Failed" rows in the Models tab.
    assert MlflowClient().search_logged_models([exp]) == []


def test_sync_error_is_raised_by_the_save_itself(tracking: str, tmp_path: Path) -> None:
    exp = _broken_experiment(tmp_path)
    with mlflow.start_run(run_name="e", experiment_id=exp):
        mgr = mlflow_ckpt.CheckpointManager(small_state(), async_save=False)
        with pytest.raises(
            mlflow_ckpt.CheckpointWriteError, match="no earlier checkpoint was affected"
        ):
            mgr.save(0)
        with pytest.raises(mlflow_ckpt.CheckpointWriteError):
            mgr.close()  # save_last tries the unsaved step 0 once more


def test_interpreter_exit_flushes_pending_async_save(
    tracking: str, tmp_path: Path, run_child
) -> None:
    script = tmp_path / "exit_script.py"
    script.write_text(
        "import mlflow, torch, mlflow_ckpt\n"
        "run = mlflow.start_run(run_name='exit')\n"
        "print(run.info.run_id, flush=True)\n"
        "mgr = mlflow_ckpt.CheckpointManager({'w': torch.randn(3_000_000)})\n"
        "mgr.step(0, {'loss': 1.0})\n"
        "mgr.save(0)\n"
        "# no wait(), no close(): the interpreter exits with the save in flight\n"
    )
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        out = run_child("exit_script")
    finally:
        sys.path.remove(str(tmp_path))
    run_id = out.stdout.split()[0]
    (ckpt,) = mlflow_ckpt.list_checkpoints(run_id)
    assert ckpt.step == 0 and ckpt.metrics == {"loss": 1.0}


def test_steps_must_increase(tracking: str) -> None:
    with mlflow.start_run(run_name="s"):
        with mlflow_ckpt.CheckpointManager(small_state()) as mgr:
            mgr.step(5)
            with pytest.raises(ValueError, match="does not come after step 5"):
                mgr.step(5)
            with pytest.raises(ValueError, match="non-negative"):
                mgr.step(-1)


def test_closed_manager_refuses_work(tracking: str) -> None:
    with mlflow.start_run(run_name="c"):
        mgr = mlflow_ckpt.CheckpointManager(small_state())
        mgr.close()
        with pytest.raises(mlflow_ckpt.CheckpointError, match="closed"):
            mgr.step(0)


def test_async_saves_reusing_host_memory_commit_what_each_step_held(tracking: str) -> None:
    """Each snapshot lands in the previous one's memory: every checkpoint must still hold
    its own step's values (the previous save is committed before its memory is reused)."""
    w = torch.zeros(4096)
    with mlflow.start_run() as run:
        manager = mlflow_ckpt.CheckpointManager(
            {"w": w}, save_every_n_steps=1, async_save=True, timeline=False
        )
        for step in range(4):
            w.fill_(float(step))
            manager.step(step)
        manager.close()
    for ckpt in mlflow_ckpt.list_checkpoints(run.info.run_id):
        saved = mlflow_ckpt.load_training_state(ckpt.uri)["w"]
        assert torch.equal(saved, torch.full((4096,), float(ckpt.step)))

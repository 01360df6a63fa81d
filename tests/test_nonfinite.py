"""A diverged state (NaN or inf in any floating-point tensor) is never committed by default."""

from __future__ import annotations

import math
import warnings

import mlflow
import pytest
import torch
from mlflow import MlflowClient

import mlflow_ckpt
from mlflow_ckpt.catalog import tags
from mlflow_ckpt.errors import NonFiniteStateError


def _state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    return {"model": model, "optimizer": opt}


def _train(state: dict) -> None:
    state["model"](torch.randn(2, 4)).sum().backward()
    state["optimizer"].step()
    state["optimizer"].zero_grad()


@pytest.mark.parametrize("async_save", [True, False])
def test_nan_weights_are_skipped_and_the_last_finite_checkpoint_survives_retention(
    tracking: str, async_save: bool
) -> None:
    """The issue's scenario: NaN from step 6 on, saving every step with keep_last_n=2."""
    state = _state()
    with mlflow.start_run(run_name="nan") as run:
        mgr = mlflow_ckpt.CheckpointManager(
            state, save_every_n_steps=1, keep_last_n=2, async_save=async_save
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(10):
                _train(state)
                if step == 6:
                    with torch.no_grad():
                        state["model"].weight.fill_(math.nan)
                assert mgr.step(step, {"loss": float(step)})  # the save is attempted each time
            mgr.close()  # save_last follows the same rule (step 9 was refused already)
    run_id = run.info.run_id
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run_id)] == [5, 4]
    refused = [w for w in caught if "holds NaN or inf" in str(w.message)]
    assert len(refused) == 4 and "model/weight" in str(refused[0].message)
    assert "the checkpoint of step 5 is the newest good one" in str(refused[0].message)
    client = MlflowClient()
    assert client.get_run(run_id).data.tags[tags.RUN_NONFINITE_STEP] == "6"
    # the refused steps' metrics still reached the run's history; no LoggedModel for them
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(10))
    steps = {m.tags[tags.STEP] for m in client.search_logged_models([run.info.experiment_id])}
    assert steps == {"4", "5"}

    # resume restores the last finite state; the tag keeps naming the first refused step
    fresh = _state(seed=1)
    resumed = mlflow_ckpt.CheckpointManager.resume(run_id, fresh, save_every_n_steps=1)
    assert resumed.start_step == 6
    assert torch.isfinite(fresh["model"].weight).all()
    with torch.no_grad():
        fresh["model"].weight.fill_(math.inf)
    with pytest.warns(UserWarning, match="holds NaN or inf"):
        resumed.step(6)
        resumed.wait()
    resumed.close()
    mlflow.end_run()
    assert client.get_run(run_id).data.tags[tags.RUN_NONFINITE_STEP] == "6"


def test_nonfinite_optimizer_state_counts_too_and_raise_stops(tracking: str) -> None:
    state = _state()
    _train(state)
    with mlflow.start_run(run_name="raise") as run:
        mgr = mlflow_ckpt.CheckpointManager(state, nonfinite="raise", async_save=False)
        mgr.save(0)
        opt_state = state["optimizer"].state[state["model"].weight]
        opt_state["exp_avg_sq"][0, 0] = math.inf
        with pytest.raises(NonFiniteStateError, match=r"Step 1 .*optimizer.*step 0 is the newest"):
            mgr.save(1)
        mgr.close()
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run.info.run_id)] == [0]


def test_raise_surfaces_on_the_next_call_in_async_mode(tracking: str) -> None:
    state = _state()
    with mlflow.start_run(run_name="async-raise"):
        mgr = mlflow_ckpt.CheckpointManager(state, nonfinite="raise", save_every_n_steps=1)
        with torch.no_grad():
            state["model"].bias.fill_(math.nan)
        mgr.step(0)
        with pytest.raises(NonFiniteStateError, match=r"Step 0 .*no earlier checkpoint"):
            mgr.wait()
        mgr.close()


def test_nonfinite_save_keeps_the_old_behaviour(tracking: str) -> None:
    state = _state()
    with torch.no_grad():
        state["model"].weight.fill_(math.nan)
    with mlflow.start_run(run_name="save") as run:
        with mlflow_ckpt.CheckpointManager(state, nonfinite="save", async_save=False) as mgr:
            mgr.save(0)
    (ckpt,) = mlflow_ckpt.list_checkpoints(run.info.run_id)
    assert torch.isnan(mlflow_ckpt.load_training_state(ckpt)["model"]["weight"]).all()
    assert tags.RUN_NONFINITE_STEP not in MlflowClient().get_run(run.info.run_id).data.tags


def test_python_inf_sentinels_and_nan_metrics_do_not_block_saves(tracking: str) -> None:
    """ReduceLROnPlateau keeps best=inf before its first step; a NaN loss is only a metric."""
    state = _state()
    state["scheduler"] = torch.optim.lr_scheduler.ReduceLROnPlateau(state["optimizer"])
    assert math.isinf(state["scheduler"].state_dict()["best"])
    with mlflow.start_run(run_name="sentinel") as run:
        with mlflow_ckpt.CheckpointManager(state, async_save=False) as mgr:
            mgr.save(0, {"loss": math.nan})
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run.info.run_id)] == [0]


def test_nonfinite_option_is_checked(tracking: str) -> None:
    with mlflow.start_run(run_name="opt"):
        with pytest.raises(ValueError, match="nonfinite must be 'skip', 'save' or 'raise'"):
            mlflow_ckpt.CheckpointManager(_state(), nonfinite="ignore")


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.complex64]
)
def test_the_check_is_exact_for_every_float_type(dtype: torch.dtype) -> None:
    """A fast sum decides most tensors; finite values whose sum overflows are still finite."""
    from mlflow_ckpt.snapshot import take_snapshot
    from mlflow_ckpt.snapshot.finite import first_nonfinite

    big = torch.finfo(dtype if not dtype.is_complex else torch.float32).max / 2
    tensor = torch.full((64,), big, dtype=dtype)  # its sum overflows; every value is finite
    snapshot = take_snapshot({"t": tensor}, {"step": 0}, copy=False)
    assert first_nonfinite(snapshot) is None
    tensor[17] = math.nan
    assert first_nonfinite(snapshot) == "t"
    tensor[17] = math.inf if not dtype.is_complex else complex(1, math.inf)
    assert first_nonfinite(snapshot) == "t"


def test_save_last_on_close_follows_the_same_rule(tracking: str) -> None:
    state = _state()
    with mlflow.start_run(run_name="last") as run:
        mgr = mlflow_ckpt.CheckpointManager(state, save_every_n_steps=5)
        for step in range(8):
            _train(state)
            mgr.step(step)
        with torch.no_grad():
            state["model"].weight.fill_(math.nan)  # diverged after the last save
        with pytest.warns(UserWarning, match="Step 7 .*NaN or inf.*step 4 is the newest good"):
            mgr.close()  # save_last tries step 7 and refuses it
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run.info.run_id)] == [4]

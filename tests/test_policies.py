"""Adaptive save interval (Young-Daly) and keeping the checkpoint before a loss spike."""

from __future__ import annotations

import math

import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

import mlflow_ckpt
from mlflow_ckpt.catalog import tags
from mlflow_ckpt.cli import main as cli
from mlflow_ckpt.manager import StepInfo
from mlflow_ckpt.manager.spikes import SpikeWatch
from mlflow_ckpt.manager.triggers import INTERVAL_PARAM, YoungDalyInterval


def _info(now: float, last_save: float, step: int = 0) -> StepInfo:
    return StepInfo(step, None, {}, False, now, last_save)


def test_young_daly_interval_follows_the_measured_save_cost_with_an_injected_clock() -> None:
    trigger = YoungDalyInterval(mtbf_hours=2.0)  # MTBF 7200 s
    assert trigger.interval_s == pytest.approx(math.sqrt(2 * 1.0 * 7200))  # 120 s, C guessed 1 s
    assert trigger.params() == {INTERVAL_PARAM: "120"}
    assert trigger.changed_metrics() == {INTERVAL_PARAM: pytest.approx(120.0)}
    assert not trigger.fires(_info(now=1119.9, last_save=1000.0))
    assert trigger.fires(_info(now=1120.0, last_save=1000.0))
    trigger.observe_save(4.0)  # the first measured save: C = 4 s
    assert trigger.interval_s == pytest.approx(math.sqrt(2 * 4.0 * 7200))  # 240 s
    assert trigger.changed_metrics() == {INTERVAL_PARAM: pytest.approx(240.0)}
    assert not trigger.fires(_info(now=1239.0, last_save=1000.0))
    assert trigger.fires(_info(now=1240.0, last_save=1000.0))
    trigger.observe_save(4.2)  # C = 4.1: the interval moves by ~1%, no new metric
    assert trigger.changed_metrics() == {}
    trigger.observe_save(16.0)  # C = 10.05: it moves a lot
    assert trigger.changed_metrics() == {INTERVAL_PARAM: pytest.approx(math.sqrt(2 * 10.05 * 7200))}
    restored = YoungDalyInterval(mtbf_hours=2.0)
    restored.load_state_dict(trigger.state_dict())
    assert restored.interval_s == pytest.approx(trigger.interval_s)


def test_auto_interval_is_logged_as_a_param_at_start_and_a_metric_as_it_changes(
    tracking: str,
) -> None:
    state = {"w": torch.zeros(10)}
    with mlflow.start_run(run_name="auto") as run:
        mgr = mlflow_ckpt.CheckpointManager(
            state, save_every_n_seconds="auto", mtbf_hours=1e-9, async_save=False
        )  # MTBF 3.6 us: a save is due at every step
        for step in range(4):
            mgr.step(step, {"loss": 1.0})
        mgr.close()
    run_id = run.info.run_id
    client = MlflowClient()
    start = float(client.get_run(run_id).data.params[INTERVAL_PARAM])
    assert start == pytest.approx(math.sqrt(2 * 1.0 * 1e-9 * 3600), rel=1e-5)
    history = client.get_metric_history(run_id, INTERVAL_PARAM)
    assert history[0].step == 0 and history[0].value == pytest.approx(start)
    assert len(history) >= 2  # re-estimated from the measured saves (they cost far less than 1 s)
    assert history[-1].value < start
    assert [c.triggers for c in mlflow_ckpt.list_checkpoints(run_id)][-1] == ("time",)
    # resume keeps the measured cost and does not log the start param again (MLflow refuses
    # a changed param value)
    resumed = mlflow_ckpt.CheckpointManager.resume(
        run_id, state, save_every_n_seconds="auto", mtbf_hours=1e-9
    )
    resumed.close()
    mlflow.end_run()
    assert client.get_run(run_id).data.params[INTERVAL_PARAM] == f"{start:.6g}"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"save_every_n_seconds": "auto"}, "go together"),
        ({"mtbf_hours": 24.0}, "go together"),
        ({"save_every_n_seconds": "auto", "mtbf_hours": -1.0}, "mtbf_hours must be positive"),
        ({"spike_factor": 3.0}, "spike_factor needs a metric"),
        ({"spike_factor": 0.5, "monitor": "loss"}, "spike_factor must be above 1"),
        ({"spike_factor": 3.0, "monitor": "acc", "mode": "max"}, "pass spike_metric="),
        ({"save_every_n_seconds": "auto", "mtbf_hours": math.nan}, "positive and finite"),
        ({"save_every_n_seconds": math.inf}, "positive and finite"),
        ({"spike_factor": math.nan, "monitor": "loss"}, "positive and finite"),
    ],
)
def test_policy_options_are_checked(tracking: str, kwargs: dict, match: str) -> None:
    with mlflow.start_run(run_name="opts"):
        with pytest.raises(ValueError, match=match):
            mlflow_ckpt.CheckpointManager({"w": torch.zeros(1)}, **kwargs)


def test_spike_watch_fires_once_per_spike() -> None:
    watch = SpikeWatch("loss", factor=3.0, min_points=3)
    assert [watch.observe(v) for v in (1.0, 1.1, 0.9)] == [None, None, None]
    assert watch.observe(2.9) is None  # below 3 x median 1.0
    assert "loss=5 > 3 x median" in (watch.observe(5.0) or "")
    assert watch.observe(6.0) is None  # the same spike
    assert watch.observe(1.0) is None  # over
    assert watch.observe(math.nan) is not None  # NaN is a spike too
    assert SpikeWatch("loss", factor=3.0).observe(math.inf) == "loss=inf"  # even with no history
    negative = SpikeWatch("logprob", factor=3.0, min_points=3)
    assert [negative.observe(v) for v in (-1.0, -1.0, -1.0, 5.0)] == [None] * 4
    assert negative.observe(math.nan) is not None


def test_the_checkpoint_before_a_loss_spike_is_pinned_and_survives_retention(
    tracking: str,
) -> None:
    model = torch.nn.Linear(2, 2)
    losses = [1.0, 0.9, 1.1, 1.0, 0.95, 1.05, 1.0, 0.9, 6.0, 1.0, 0.9, 1.0, 0.95, 1.0]
    with mlflow.start_run(run_name="spike") as run:
        mgr = mlflow_ckpt.CheckpointManager(
            {"model": model},
            save_every_n_steps=3,
            keep_last_n=1,
            spike_factor=3.0,
            spike_metric="loss",
        )
        for step, loss in enumerate(losses):
            mgr.step(step, {"loss": loss})
        mgr.close()
    run_id = run.info.run_id
    # saves at 2, 5, 8, 11 and 13 (last); the spike is at step 8: step 5 was the newest before
    ckpts = mlflow_ckpt.list_checkpoints(run_id)
    assert [(c.step, c.pinned) for c in ckpts] == [(13, None), (5, tags.PRE_SPIKE)]
    listing = CliRunner().invoke(cli, ["list", run_id])
    assert listing.exit_code == 0 and "pre_spike" in listing.output
    pinned = ckpts[1]
    dry = CliRunner().invoke(cli, ["gc", run_id, "--keep-last", "1", "--dry-run"])
    assert "protected step 5" in dry.output and "pinned: pre_spike" in dry.output, dry.output
    unpin = CliRunner().invoke(cli, ["unpin", pinned.uri])
    assert unpin.exit_code == 0 and "unpinned" in unpin.output, unpin.output
    gc = CliRunner().invoke(cli, ["gc", run_id, "--keep-last", "1"])
    assert gc.exit_code == 0, gc.output
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run_id)] == [13]
    again = CliRunner().invoke(cli, ["pin", ckpts[0].uri, "--reason", "release"])
    assert again.exit_code == 0
    assert mlflow_ckpt.latest_checkpoint(run_id).pinned == "release"


def test_the_spike_watch_carries_its_history_across_a_resume(tracking: str) -> None:
    state = {"w": torch.zeros(3)}
    with mlflow.start_run(run_name="resume-spike") as run:
        with mlflow_ckpt.CheckpointManager(
            state, save_every_n_steps=1, monitor="loss", spike_factor=3.0, async_save=False
        ) as mgr:
            for step in range(6):
                mgr.step(step, {"loss": 1.0})
    resumed = mlflow_ckpt.CheckpointManager.resume(
        run.info.run_id, state, save_every_n_steps=1, monitor="loss", spike_factor=3.0
    )
    resumed.step(6, {"loss": 10.0})  # a spike right after the resume: history came back
    resumed.close()
    mlflow.end_run()
    pinned = [c.step for c in mlflow_ckpt.list_checkpoints(run.info.run_id) if c.pinned]
    assert pinned == [5]

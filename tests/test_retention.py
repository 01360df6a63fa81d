"""Retention: composable policies, applied by MLflow queries, deleting bytes and models."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

import mlflow_ckpt
from mlflow_ckpt.manager.retention import (
    KeepAny,
    KeepBestN,
    KeepEveryNSteps,
    KeepLastN,
    apply_retention,
    is_milestone,
)


def val_loss(step: int) -> float:
    return abs(step - 35) / 100  # best checkpoints: steps 39 (0.04) and 29 (0.06)


def model_folders(exp_id: str) -> set[str]:
    root = Path(MlflowClient().get_experiment(exp_id).artifact_location) / "models"
    return {p.name for p in root.iterdir()} if root.exists() else set()


@pytest.mark.parametrize("async_save", [True, False])
def test_keep_last_2_and_best_2_over_100_steps(tracking: str, async_save: bool) -> None:
    model = torch.nn.Linear(4, 4)
    with mlflow.start_run(run_name="ret") as run:
        with mlflow_ckpt.CheckpointManager(
            {"model": model},
            save_every_n_steps=10,
            monitor="val_loss",
            keep_last_n=2,
            keep_best_n=2,
            async_save=async_save,
        ) as mgr:
            for s in range(100):
                metrics = {"val_loss": val_loss(s)} if (s + 1) % 10 == 0 else {}
                mgr.step(s, metrics)
    ckpts = mlflow_ckpt.list_checkpoints(run.info.run_id)
    assert sorted(c.step for c in ckpts) == [29, 39, 89, 99]
    # the artifact store holds exactly their files: no folder of a deleted checkpoint remains
    assert model_folders(run.info.experiment_id) == {c.model_id for c in ckpts}
    for c in ckpts:
        assert (Path(c.artifact_location) / "manifest.json").exists()
    # the deleted LoggedModels are gone from MLflow too
    assert len(MlflowClient().search_logged_models([run.info.experiment_id])) == 4


def _saved(steps_values: list[tuple[int, float]]) -> str:
    with mlflow.start_run(run_name="r") as run:
        with mlflow_ckpt.CheckpointManager({"w": torch.zeros(2)}, async_save=False) as mgr:
            for step, value in steps_values:
                mgr.save(step, {"loss": value})
    return run.info.run_id


def test_policies_compose_and_newest_is_always_kept(tracking: str) -> None:
    run_id = _saved([(0, 5.0), (1, 1.0), (2, float("nan")), (3, 4.0), (4, 3.0), (5, 9.0)])
    ckpts = mlflow_ckpt.list_checkpoints(run_id)
    steps = {c.model_id: c.step for c in ckpts}
    assert {steps[m] for m in KeepLastN(2).keep(ckpts)} == {4, 5}
    assert {steps[m] for m in KeepBestN(2, "loss").keep(ckpts)} == {1, 4}  # NaN never best
    assert {steps[m] for m in KeepBestN(1, "loss", "max").keep(ckpts)} == {5}
    assert {steps[m] for m in KeepEveryNSteps(3).keep(ckpts)} == {2, 5}
    policy = KeepAny((KeepBestN(1, "loss"), KeepEveryNSteps(3)))
    # what incremental saves write self-contained: the steps a nested KeepEveryNSteps keeps
    nested = KeepAny((KeepLastN(1), policy))
    assert [s for s in range(7) if is_milestone(nested, s)] == [2, 5]
    assert not any(is_milestone(p, 2) for p in (None, KeepLastN(3), KeepBestN(1, "loss")))
    result = apply_retention(MlflowClient(), run_id, policy, dry_run=True)
    assert sorted(c.step for c in result.deleted) == [0, 3, 4]
    assert len(mlflow_ckpt.list_checkpoints(run_id)) == 6  # dry run deleted nothing
    result = apply_retention(MlflowClient(), run_id, KeepBestN(1, "loss"))
    assert sorted(c.step for c in mlflow_ckpt.list_checkpoints(run_id)) == [1, 5]  # 5: newest


def test_best_uses_value_at_the_checkpoints_step(tracking: str) -> None:
    """MLflow sorts models by their latest metric value; we use the value at the step."""
    with mlflow.start_run(run_name="r") as run:
        with mlflow_ckpt.CheckpointManager({"w": torch.zeros(2)}, async_save=False) as mgr:
            mgr.save(0, {"loss": 1.0})
            mgr.save(1, {"loss": 2.0})
    client = MlflowClient()
    first = mlflow_ckpt.list_checkpoints(run.info.run_id)[-1]
    # a later value linked to the first model at another step must not change its score
    client.log_metric(run.info.run_id, "loss", 9.0, step=7, model_id=first.model_id)
    best = mlflow_ckpt.best_checkpoint(run_id=run.info.run_id, metric="loss")
    assert best.step == 0 and best.metrics["loss"] == 1.0


def test_query_failure_deletes_nothing(tracking: str) -> None:
    run_id = _saved([(0, 1.0), (1, 2.0), (2, 3.0)])
    dead = MlflowClient(tracking_uri="http://127.0.0.1:9")  # nothing listens there
    import os

    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        result = apply_retention(dead, run_id, KeepLastN(1))
    finally:
        del os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    assert result.deleted == [] and result.kept == []
    assert len(mlflow_ckpt.list_checkpoints(run_id)) == 3


def test_keep_best_needs_a_metric(tracking: str) -> None:
    with mlflow.start_run(run_name="r"), pytest.raises(ValueError, match="monitor="):
        mlflow_ckpt.CheckpointManager({"w": torch.zeros(2)}, keep_best_n=2)

"""Promotion to the model registry, serving by alias, and protection from retention."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow import MlflowClient

import mlflow_ckpt
from mlflow_ckpt.manager.retention import KeepLastN, apply_retention
from tests.train_script import DIM, Net


def trained_run(lr: float, steps: int = 6) -> str:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    with mlflow.start_run(run_name=f"lr={lr}") as run:
        mlflow.set_tag("team", "vision" if lr > 0.05 else "nlp")
        with mlflow_ckpt.CheckpointManager(
            {"model": model, "opt": opt},
            save_every_n_steps=2,
            model_factory=Net,
            async_save=False,
        ) as mgr:
            for s in range(steps):
                x = torch.randn(8, DIM, generator=gen)
                loss = model(x).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                mgr.step(s, {"val_loss": loss.item() + lr})
    return run.info.run_id


def test_promote_then_serve_by_alias_like_the_checkpoint(tracking: str) -> None:
    run_id = trained_run(0.1)
    ckpt = mlflow_ckpt.best_checkpoint(run_id=run_id, metric="val_loss")
    version = mlflow_ckpt.promote(ckpt, "clf", alias="champion", tags={"source": "test"})
    assert str(version.version) == "1" and ckpt.model_id in version.source
    assert version.tags["source"] == "test"
    batch = np.random.default_rng(1).normal(size=(4, DIM)).astype(np.float32)
    direct = mlflow.pyfunc.load_model(ckpt.uri).predict(batch)
    served = mlflow.pyfunc.load_model("models:/clf@champion").predict(batch)
    np.testing.assert_array_equal(served, direct)
    # loading through the registry URI works for the library's own loaders too
    assert mlflow_ckpt.load("models:/clf@champion", {"model": Net()}).model_id == ckpt.model_id
    assert mlflow_ckpt.load("models:/clf/1", {"model": Net()}).model_id == ckpt.model_id
    # a second promotion moves the alias
    newest = mlflow_ckpt.latest_checkpoint(run_id)
    mlflow_ckpt.promote(newest.uri, "clf")
    assert str(MlflowClient().get_model_version_by_alias("clf", "champion").version) == "2"


def test_pyfunc_accepts_dataframes_and_dicts(tracking: str) -> None:
    run_id = trained_run(0.1, steps=2)
    model = mlflow.pyfunc.load_model(mlflow_ckpt.latest_checkpoint(run_id).uri)
    batch = np.random.default_rng(2).normal(size=(3, DIM))
    as_array = model.predict(batch)
    np.testing.assert_allclose(model.predict(pd.DataFrame(batch)), as_array)
    np.testing.assert_allclose(model.predict({"x": batch}), as_array)
    assert as_array.shape == (3, 3)


def test_promoted_checkpoint_survives_retention(tracking: str) -> None:
    run_id = trained_run(0.1)
    oldest = mlflow_ckpt.list_checkpoints(run_id)[-1]
    mlflow_ckpt.promote(oldest, "keepme")
    result = apply_retention(MlflowClient(), run_id, KeepLastN(1))
    assert [c.step for c in result.protected] == [oldest.step]
    steps = sorted(c.step for c in mlflow_ckpt.list_checkpoints(run_id))
    assert steps == [oldest.step, 5]
    batch = np.zeros((1, DIM), dtype=np.float32)
    assert mlflow.pyfunc.load_model("models:/keepme@champion").predict(batch).shape == (1, 3)


def test_best_across_runs_and_filter_by_run_tags(tracking: str) -> None:
    high, low = trained_run(0.1), trained_run(0.01)
    exp = MlflowClient().get_run(high).info.experiment_id
    best = mlflow_ckpt.best_checkpoint(experiment_ids=[exp], metric="val_loss")
    every = mlflow_ckpt.list_checkpoints(high) + mlflow_ckpt.list_checkpoints(low)
    assert best.metrics["val_loss"] == min(c.metrics["val_loss"] for c in every)
    only_high = mlflow_ckpt.best_checkpoint(
        experiment_ids=[exp], metric="val_loss", filter_string=f"source_run_id = '{high}'"
    )
    assert only_high.run_id == high
    by_run_tag = mlflow_ckpt.best_checkpoint(
        experiment_ids=[exp], metric="val_loss", run_filter="tags.team = 'nlp'"
    )
    assert by_run_tag.run_id == low
    worst = mlflow_ckpt.best_checkpoint(experiment_ids=[exp], metric="val_loss", mode="max")
    assert worst.metrics["val_loss"] == max(c.metrics["val_loss"] for c in every)

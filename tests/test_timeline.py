"""A picture of a run's checkpoints: logged at close() and drawn by `mlflow-ckpt plot`."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import torch
from click.testing import CliRunner
from mlflow import MlflowClient
from PIL import Image

import mlflow_ckpt
from mlflow_ckpt.catalog import timeline
from mlflow_ckpt.cli import main as cli
from tests.train_script import Net


def test_the_timeline_shows_every_kind_of_checkpoint(tracking: str, tmp_path: Path) -> None:
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # a user's backend (not Agg): drawing the timeline must keep it
    model = Net()
    losses = [1.0, 0.8, 0.9, 0.7, 0.75, 0.72, 0.7, 5.0, 0.6, 0.55, 0.5, 0.52]
    refuse_at = {9}

    def validate(rebuilt: torch.nn.Module) -> bool:
        return not validate.refuse  # type: ignore[attr-defined]

    validate.refuse = False  # type: ignore[attr-defined]
    with mlflow.start_run(run_name="timeline") as run:
        mgr = mlflow_ckpt.CheckpointManager(
            {"model": model},
            save_every_n_steps=2,
            monitor="loss",
            keep_last_n=2,
            spike_factor=3.0,
            model_factory=Net,
            verify=validate,
            on_error="warn",
            async_save=False,
        )
        for step, loss in enumerate(losses):
            validate.refuse = step == 3  # type: ignore[attr-defined]
            backup = model.body[0].weight.detach().clone()
            if step in refuse_at:
                with torch.no_grad():
                    model.body[0].weight.fill_(math.nan)
            mgr.step(step, {"loss": loss})
            with torch.no_grad():
                model.body[0].weight.copy_(backup)
        promoted = mlflow_ckpt.best_checkpoint(run_id=run.info.run_id, metric="loss")
        assert promoted is not None
        mlflow_ckpt.promote(promoted, "timeline-model")
        mgr.close()
    run_id = run.info.run_id
    assert matplotlib.get_backend() == "svg"
    matplotlib.use(before)
    line = timeline.gather(MlflowClient(), run_id)
    assert line.metric == "loss"  # found from the run's tag, not told
    assert [s for s, _ in line.curve] == list(range(len(losses)))
    steps = {k: sorted(set(v)) for k, v in line.steps.items()}
    assert steps["bad"] == [3]  # failed validation: invalid
    assert steps["nonfinite"] == [9]  # refused: NaN weights
    assert steps["pinned"] == [5]  # the newest checkpoint before the spike at step 7
    assert steps["promoted"] == steps["best"] == [promoted.step]
    assert steps["deleted"]  # retention removed some
    assert not set(steps["deleted"]) & set(steps["kept"])

    # logged at close() under the run's artifacts
    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="mlflow_ckpt/timeline.png", dst_path=str(tmp_path / "dl")
    )
    assert Image.open(local).size == (1000, 450)

    out = tmp_path / "plot.png"
    result = CliRunner().invoke(cli, ["plot", run_id, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output and "1 pinned" in result.output
    assert Image.open(out).size == (1000, 450)


def test_plot_without_a_metric_and_timeline_off(tracking: str, tmp_path: Path) -> None:
    with mlflow.start_run(run_name="plain") as run:
        with mlflow_ckpt.CheckpointManager(
            {"w": torch.zeros(2)}, save_every_n_steps=1, timeline=False
        ) as mgr:
            for step in range(3):
                mgr.step(step)
    artifacts = MlflowClient().list_artifacts(run.info.run_id)
    assert [a.path for a in artifacts] == []  # timeline=False logs no picture
    out = tmp_path / "p.png"
    result = CliRunner().invoke(cli, ["plot", run.info.run_id, "-o", str(out)])
    assert result.exit_code == 0 and "3 kept" in result.output, result.output
    assert out.stat().st_size > 0

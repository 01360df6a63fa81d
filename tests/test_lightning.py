"""The Lightning callback against real Lightning and real MLflow, on CPU with tiny data."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

import mlflow_ckpt
from mlflow_ckpt.integrations.resume_folder import PREFIX

pl = pytest.importorskip("lightning.pytorch")

from mlflow_ckpt.lightning import MlflowCheckpoint  # noqa: E402


class LitRegressor(pl.LightningModule):
    """A small model with dropout, a shuffled loader and an LR schedule: all must resume."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, width),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(width, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self) -> dict:
        opt = torch.optim.AdamW(self.parameters(), lr=0.01)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
        return {"optimizer": opt, "lr_scheduler": sched}


def loaders() -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(64, 1, generator=g)
    data = torch.utils.data.TensorDataset(x, y)
    train = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True)
    val = torch.utils.data.DataLoader(data, batch_size=32)
    return train, val


def trainer(max_epochs: int, *callbacks: pl.Callback) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        num_sanity_val_steps=0,
        deterministic=True,
        callbacks=list(callbacks),
    )


def fit(max_epochs: int, callback: pl.Callback | None = None, ckpt_path: str | None = None):
    pl.seed_everything(7, verbose=False)
    model = LitRegressor()
    train, val = loaders()
    t = trainer(max_epochs, *([callback] if callback else []))
    t.fit(model, train, val, ckpt_path=ckpt_path)
    return model, t


@pytest.mark.parametrize("dst", [False, True], ids=["temporary", "dst"])
def test_resume_gives_the_same_weights_as_training_straight(
    tracking: str, tmp_path: Path, own_tempdir: Path, dst: bool
) -> None:
    straight, _ = fit(4)

    _, t = fit(2, MlflowCheckpoint(async_save=False))
    run_id = next(cb.run_id for cb in t.callbacks if isinstance(cb, MlflowCheckpoint))
    assert mlflow.active_run() is None  # the run the callback started is ended after fit
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run_id)] == [7, 3]

    path = mlflow_ckpt.resume_path(run_id, dst=tmp_path / "resume" if dst else None)
    assert Path(path).is_file()
    pl.seed_everything(123, verbose=False)  # resume must not depend on the seed in force
    model = LitRegressor()
    train, val = loaders()
    callback = MlflowCheckpoint(async_save=False)
    t2 = trainer(4, callback)
    t2.fit(model, train, val, ckpt_path=path)

    assert callback.run_id == run_id  # the same MLflow run goes on
    # a folder resume_path made is removed once read; one the user chose is kept
    assert Path(path).is_file() == dst
    assert not list(own_tempdir.glob(f"{PREFIX}*"))
    assert t2.global_step == 16 and t2.current_epoch == 4
    for key, value in straight.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    assert t2.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01 * 0.7**4)
    steps = [c.step for c in mlflow_ckpt.list_checkpoints(run_id)]
    assert steps == [15, 11, 7, 3]
    run = MlflowClient().get_run(run_id)
    assert run.data.tags["mlflow_ckpt.resumes"] == "1"
    # every epoch's val_loss logged once, by the callback
    history = MlflowClient().get_metric_history(run_id, "val_loss")
    assert sorted(m.step for m in history) == [3, 7, 11, 15]


def test_resume_from_a_foreign_ckpt_is_refused(tracking: str, tmp_path: Path) -> None:
    _, t = fit(2, MlflowCheckpoint(async_save=False))
    run_id = next(cb.run_id for cb in t.callbacks if isinstance(cb, MlflowCheckpoint))
    path = Path(mlflow_ckpt.resume_path(run_id, dst=tmp_path / "resume"))
    # Lightning's own checkpoint of another step (it carries our callback's run ID too)
    foreign = torch.load(path, weights_only=False)
    foreign["global_step"] = 4
    stale = tmp_path / "last.ckpt"
    torch.save(foreign, stale)
    with pytest.raises(mlflow_ckpt.CheckpointError, match=r"global step 4, .* at step 8"):
        fit(4, MlflowCheckpoint(async_save=False), ckpt_path=str(stale))
    assert mlflow.active_run() is None
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run_id)] == [7, 3]  # nothing written


def test_checkpoint_holds_lightning_state_and_best(tracking: str) -> None:
    with mlflow.start_run() as run:
        fit(3, MlflowCheckpoint(monitor="val_loss", keep_best_n=1, keep_last_n=1, async_save=False))
        assert mlflow.active_run().info.run_id == run.info.run_id  # the user's run stays open
    best = mlflow_ckpt.best_checkpoint(run_id=run.info.run_id, metric="val_loss")
    assert best is not None and "val_loss" in best.metrics
    state = mlflow_ckpt.load_training_state(best.uri)
    lightning_state = state["lightning"]
    for key in ("loops", "optimizer_states", "lr_schedulers", "callbacks", "state_dict", "epoch"):
        assert key in lightning_state, key
    assert lightning_state["callbacks"]["MlflowCheckpoint"]["run_id"] == run.info.run_id
    assert len(mlflow_ckpt.list_checkpoints(run.info.run_id)) <= 2


def test_steps_within_epochs_are_saved_and_metrics_logged_once(tracking: str) -> None:
    with mlflow.start_run() as run:
        fit(2, MlflowCheckpoint(save_every_n_steps=2, async_save=False))
    run_id = run.info.run_id
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run_id)] == [7, 5, 3, 1]
    client = MlflowClient()
    # epoch-level metrics reach the run once per epoch, not again at every step
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [3, 7]
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [3, 7]
    assert "val_loss" in mlflow_ckpt.latest_checkpoint(run_id).metrics


def test_non_zero_rank_does_not_save(tracking: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pl.Trainer, "is_global_zero", property(lambda self: False))
    callback = MlflowCheckpoint(async_save=False)
    with mlflow.start_run() as run:
        fit(1, callback)
    assert callback.manager is None
    assert mlflow_ckpt.list_checkpoints(run.info.run_id) == []


def test_works_with_mlflow_pytorch_autolog_without_double_logging(tracking: str) -> None:
    mlflow.pytorch.autolog(log_models=False, checkpoint=False)
    try:
        pl.seed_everything(7, verbose=False)
        model = LitRegressor()
        train, val = loaders()
        callback = MlflowCheckpoint(async_save=False)
        t = trainer(2, callback)
        t.fit(model, train, val)
    finally:
        mlflow.pytorch.autolog(disable=True)
    run_id = callback.run_id
    history = MlflowClient().get_metric_history(run_id, "val_loss")
    # mlflow autolog logs each epoch (steps 0, 1); our checkpoints only link theirs (3, 7)
    autologged = [m for m in history if m.step in (0, 1)]
    linked = [m for m in history if m.step in (3, 7)]
    assert len(autologged) == 2 and len(linked) == 2 and len(history) == 4
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run_id)] == [7, 3]
    train_loss = MlflowClient().get_metric_history(run_id, "train_loss")
    assert len(train_loss) == 4  # 2 from autolog, 2 linked to the checkpoints; none per step


def _seeded_loaders() -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """The train loader shuffled by a generator of its own: the global streams do not
    cover its order, so only the checkpointed generator makes a resume exact."""
    train, val = loaders()
    seeded = torch.utils.data.DataLoader(
        train.dataset, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(3)
    )
    return seeded, val


def _fit_seeded(max_epochs: int, callback: pl.Callback | None = None, **fit_kwargs: object):
    pl.seed_everything(7, verbose=False)
    model = LitRegressor()
    t = trainer(max_epochs, *([callback] if callback else []))
    t.fit(model, *_seeded_loaders(), **fit_kwargs)
    return model, t


def test_explicit_callback_resumes_the_job_with_resume_path_auto_and_a_seeded_loader(
    tracking: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_CKPT_RUN_KEY", raising=False)
    straight, _ = _fit_seeded(4)
    assert mlflow_ckpt.resume_path("auto", run_name="lit-job") is None  # a first start
    first = MlflowCheckpoint(resume="auto", run_name="lit-job", async_save=False)
    _fit_seeded(2, first, ckpt_path=mlflow_ckpt.resume_path("auto", run_name="lit-job"))
    assert mlflow.active_run() is None  # the callback ends the run it opened

    # the same line on the restart: the job's newest checkpoint, through Lightning
    resumed = MlflowCheckpoint(resume="auto", run_name="lit-job", async_save=False)
    path = mlflow_ckpt.resume_path("auto", run_name="lit-job")
    model, t = _fit_seeded(4, resumed, ckpt_path=path)
    assert resumed.run_id == first.run_id and t.global_step == 16
    for key, value in straight.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_explicit_callback_given_no_checkpoint_of_a_job_that_has_one_is_refused(
    tracking: str,
) -> None:
    _fit_seeded(1, MlflowCheckpoint(resume="auto", run_name="lit-once", async_save=False))
    with pytest.raises(mlflow_ckpt.CheckpointError, match=r"ckpt_path=mlflow_ckpt.resume_path"):
        _fit_seeded(2, MlflowCheckpoint(resume="auto", run_name="lit-once", async_save=False))

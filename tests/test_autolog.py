"""``mlflow_ckpt.autolog()``: plain loops through optimizer hooks, framework patches, undo."""

from __future__ import annotations

import importlib
from collections.abc import Iterator

import mlflow
import pytest
import torch
from mlflow import MlflowClient

import mlflow_ckpt

autolog_module = importlib.import_module("mlflow_ckpt.autolog")
patching = importlib.import_module("mlflow_ckpt.integrations.patching")


@pytest.fixture(autouse=True)
def _undo() -> Iterator[None]:
    yield
    mlflow_ckpt.autolog(disable=True)


def make() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)


def train(model, opt, sched, start: int, stop: int, val_losses: list[float]) -> None:
    """A loop that knows nothing about checkpoints: it only logs to MLflow."""
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    for step in range(start, stop):
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        sched.step()
        mlflow.log_metric("train_loss", loss.item(), step=step)
        mlflow.log_metrics({"val_loss": val_losses[step]}, step=step)


VAL = [5.0, 4.0, 4.5, 3.0, 3.5, 3.6, 2.0, 2.5]


def test_plain_loop_gets_periodic_and_best_checkpoints(tracking: str) -> None:
    model, opt, sched = make()
    with mlflow.start_run() as run:
        session = mlflow_ckpt.autolog(
            model=model,
            optimizer=opt,
            scheduler=sched,
            save_every_n_steps=4,
            monitor="val_loss",
            keep_best_n=2,
            keep_last_n=1,
            async_save=False,
        )
        assert session is not None and session.start_step == 0
        train(model, opt, sched, 0, 8, VAL)
        mlflow_ckpt.autolog(disable=True)  # records the last step and closes
    ckpts = mlflow_ckpt.list_checkpoints(run.info.run_id)
    # the two best: 6 (2.0) and 7 (2.5, also periodic and last)
    assert sorted(c.step for c in ckpts) == [6, 7]
    best = mlflow_ckpt.best_checkpoint(run_id=run.info.run_id, metric="val_loss")
    assert best.step == 6 and best.metrics["val_loss"] == 2.0
    # the loop's metrics are in the history once each: nothing logged twice
    client = MlflowClient()
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) == 8
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 8
    # the checkpoint at step 6 holds the state after 7 optimizer steps (scheduler included)
    state = mlflow_ckpt.load_training_state(best.uri)
    assert state["scheduler"]["last_epoch"] == 7


def test_plain_loop_resume_is_one_call(tracking: str) -> None:
    model, opt, sched = make()
    with mlflow.start_run():
        train(model, opt, sched, 0, 8, VAL)  # without autolog: the reference
    straight = model.weight.detach().clone()

    model, opt, sched = make()
    with mlflow.start_run() as run:
        mlflow_ckpt.autolog(model=model, optimizer=opt, scheduler=sched, save_every_n_steps=2)
        train(model, opt, sched, 0, 4, VAL)
        mlflow_ckpt.autolog(disable=True)

    model, opt, sched = make()
    session = mlflow_ckpt.autolog(
        model=model, optimizer=opt, scheduler=sched, save_every_n_steps=2, resume=run.info.run_id
    )
    assert session.start_step == 4
    assert mlflow.active_run().info.run_id == run.info.run_id
    train(model, opt, sched, session.start_step, 8, VAL)
    mlflow_ckpt.autolog(disable=True)
    assert mlflow.active_run() is None  # the run the resume reopened is ended again
    assert torch.equal(model.weight, straight)
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run.info.run_id)] == [7, 5, 3, 1]


def test_disable_restores_everything(tracking: str) -> None:
    import lightning.pytorch as pl
    import transformers

    before = {
        "fit": pl.Trainer.fit,
        "init": transformers.Trainer.__init__,
        "train": transformers.Trainer.train,
        "log_metric": mlflow.log_metric,
        "log_metrics": mlflow.log_metrics,
    }
    model, opt, sched = make()
    mlflow_ckpt.autolog(model=model, optimizer=opt, save_every_n_steps=1)
    assert pl.Trainer.fit is not before["fit"]
    assert transformers.Trainer.__init__ is not before["init"]
    assert mlflow.log_metric is not before["log_metric"]
    assert opt._optimizer_step_pre_hooks and opt._optimizer_step_post_hooks
    mlflow_ckpt.autolog(disable=True)
    after = {
        "fit": pl.Trainer.fit,
        "init": transformers.Trainer.__init__,
        "train": transformers.Trainer.train,
        "log_metric": mlflow.log_metric,
        "log_metrics": mlflow.log_metrics,
    }
    assert after == before
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert patching._PATCHES == [] and autolog_module._SESSIONS == []
    # steps after disable are not checkpointed
    with mlflow.start_run() as run:
        train(model, opt, sched, 0, 2, VAL)
    assert mlflow_ckpt.list_checkpoints(run.info.run_id) == []


def test_disable_leaves_a_later_patch_by_someone_else_in_place(tracking: str) -> None:
    mlflow_ckpt.autolog(lightning=False, transformers=False)
    model, opt, _ = make()
    mlflow_ckpt.autolog(model=model, optimizer=opt, lightning=False, transformers=False)
    ours = mlflow.log_metric

    def theirs(*args, **kwargs):
        return ours(*args, **kwargs)

    mlflow.log_metric = theirs
    try:
        mlflow_ckpt.autolog(disable=True)
        assert mlflow.log_metric is theirs  # not clobbered; ours is now a pass-through
    finally:
        mlflow.log_metric = (
            patching._PATCHES[0].original
            if patching._PATCHES
            else (mlflow.tracking.fluent.log_metric)
        )


def test_lightning_trainer_gets_the_callback(tracking: str) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from tests.test_lightning import LitRegressor, loaders, trainer

    mlflow_ckpt.autolog(save_every_n_epochs=1, async_save=False)
    pl.seed_everything(0, verbose=False)
    t = trainer(2)
    with mlflow.start_run() as run:
        t.fit(LitRegressor(), *loaders())
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run.info.run_id)] == [7, 3]
    mlflow_ckpt.autolog(disable=True)
    with mlflow.start_run() as run2:
        trainer(1).fit(LitRegressor(), *loaders())
    assert mlflow_ckpt.list_checkpoints(run2.info.run_id) == []


def test_hf_trainer_gets_the_callback(tracking: str, tmp_path) -> None:
    pytest.importorskip("transformers")
    from mlflow_ckpt.transformers import MlflowCheckpointCallback
    from tests.test_transformers import make_trainer

    mlflow_ckpt.autolog(async_save=False)
    t = make_trainer(tmp_path, 1)
    ours = [cb for cb in t.callback_handler.callbacks if isinstance(cb, MlflowCheckpointCallback)]
    assert len(ours) == 1 and ours[0].trainer is t
    with mlflow.start_run() as run:
        t.train()
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run.info.run_id)] == [3]


def _loop(session_start: int, stop: int, model, opt, loader) -> None:
    steps = session_start
    while steps < stop:
        for x, y in loader:  # a new iterator (and permutation) per epoch
            if steps >= stop:
                break
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1


def _plain_objects() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.utils.data.DataLoader]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    loader = torch.utils.data.DataLoader(
        data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(5)
    )
    return model, opt, loader


def test_plain_loop_resume_auto_continues_a_seeded_loader_bit_for_bit(
    tracking: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """4 epochs straight == 2 epochs + a new process's objects + resume="auto" + 2 epochs,
    with the loader's order coming from its own generator."""
    monkeypatch.delenv("MLFLOW_CKPT_RUN_KEY", raising=False)
    straight, opt, loader = _plain_objects()
    _loop(0, 16, straight, opt, loader)

    for start, stop in ((0, 8), (8, 16)):  # 2 epochs of 4 steps, then a restart: 2 more
        model, opt, loader = _plain_objects()  # fresh objects, as a restarted process has
        session = mlflow_ckpt.autolog(
            model=model,
            optimizer=opt,
            dataloaders=[loader],
            resume="auto",
            run_name="plain-job",
            save_every_n_steps=4,
            async_save=False,
        )
        assert session.start_step == start
        _loop(start, stop, model, opt, loader)
        mlflow_ckpt.autolog(disable=True)  # the last step saved, the run left active
        mlflow.end_run()
    for key, value in straight.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key

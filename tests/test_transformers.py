"""The Hugging Face Trainer callback against real transformers and MLflow, on CPU, no downloads."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

import mlflow_ckpt

transformers = pytest.importorskip("transformers")

from mlflow_ckpt.transformers import MlflowCheckpointCallback  # noqa: E402

logging.getLogger("transformers").setLevel(logging.ERROR)


class Tokens(torch.utils.data.Dataset):
    """Random token sequences labelled by whether their first token is even."""

    def __init__(self, n: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 50, (n, 8), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": (self.ids[i, 0] % 2).long()}


def tiny_model() -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
    )
    return transformers.BertForSequenceClassification(config)


def make_trainer(out: Path, epochs: int, *callbacks) -> transformers.Trainer:
    transformers.set_seed(11)
    args = transformers.TrainingArguments(
        output_dir=str(out),
        num_train_epochs=epochs,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        warmup_steps=2,
        eval_strategy="epoch",
        save_strategy="no",
        logging_strategy="epoch",
        report_to="none",
        use_cpu=True,
        seed=11,
        data_seed=11,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return transformers.Trainer(
        model=tiny_model(),
        args=args,
        train_dataset=Tokens(),
        eval_dataset=Tokens(16),
        callbacks=list(callbacks),
    )


def test_resume_gives_the_same_weights_as_training_straight(tracking: str, tmp_path: Path) -> None:
    straight = make_trainer(tmp_path / "a", 4)
    straight.train()

    # the first half: the schedule is for 4 epochs, stopped after 2 (as a killed job would be)
    callback = MlflowCheckpointCallback(async_save=False)
    half = make_trainer(tmp_path / "b", 4, callback)
    half.add_callback(_StopAfterEpochs(2))
    half.train()
    run_id = callback.run_id
    assert mlflow.active_run() is None
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run_id)] == [7, 3]

    path = mlflow_ckpt.resume_path(run_id, dst=tmp_path / "resume")
    torch.manual_seed(999)  # resume must not depend on the seed in force
    callback2 = MlflowCheckpointCallback(async_save=False)
    resumed = make_trainer(tmp_path / "c", 4, callback2)
    resumed.train(resume_from_checkpoint=path)

    assert callback2.run_id == run_id
    assert resumed.state.global_step == straight.state.global_step == 16
    assert resumed.state.epoch == pytest.approx(4.0)
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert resumed.lr_scheduler.get_last_lr() == straight.lr_scheduler.get_last_lr()
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run_id)] == [15, 11, 7, 3]
    assert MlflowClient().get_run(run_id).data.tags["mlflow_ckpt.resumes"] == "1"
    # eval_loss was recorded for each epoch end, once
    history = MlflowClient().get_metric_history(run_id, "eval_loss")
    assert sorted(m.step for m in history) == [3, 7, 11, 15]


class _StopAfterEpochs(transformers.TrainerCallback):
    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_epoch_end(self, args, state, control, **kwargs):
        if state.epoch >= self.epochs:
            control.should_training_stop = True


def test_best_checkpoint_and_trainer_state(tracking: str, tmp_path: Path) -> None:
    callback = MlflowCheckpointCallback(monitor="eval_loss", keep_best_n=1, async_save=False)
    with mlflow.start_run() as run:
        make_trainer(tmp_path, 2, callback).train()
        assert mlflow.active_run().info.run_id == run.info.run_id  # the user's run stays open
    best = mlflow_ckpt.best_checkpoint(run_id=run.info.run_id, metric="eval_loss")
    assert best is not None and best.metrics["eval_loss"] > 0
    state = mlflow_ckpt.load_training_state(best.uri)
    assert {"model", "optimizer", "scheduler", "hf_trainer_state", "_rng"} <= set(state)
    assert '"global_step"' in state["hf_trainer_state"]["json"]


def test_non_main_process_does_not_save(tracking: str, tmp_path: Path) -> None:
    class NotMain(transformers.TrainerCallback):
        def on_init_end(self, args, state, control, **kwargs):
            state.is_world_process_zero = False

        def on_train_begin(self, args, state, control, **kwargs):
            state.is_world_process_zero = False

    callback = MlflowCheckpointCallback(async_save=False)
    trainer = make_trainer(tmp_path, 1)
    trainer.add_callback(NotMain())  # runs before ours
    trainer.callback_handler.callbacks.sort(key=lambda cb: cb is callback)
    trainer.add_callback(callback)
    with mlflow.start_run() as run:
        trainer.train()
    assert callback.manager is None
    assert mlflow_ckpt.list_checkpoints(run.info.run_id) == []

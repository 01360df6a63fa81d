"""The Hugging Face Trainer callback against real transformers and MLflow, on CPU, no downloads."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

import mlflow_ckpt
from mlflow_ckpt.integrations.resume_folder import PREFIX

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


def make_trainer(out: Path, epochs: int, *callbacks, **overrides) -> transformers.Trainer:
    transformers.set_seed(11)
    options: dict = dict(
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
    options.update(overrides)
    args = transformers.TrainingArguments(**options)
    return transformers.Trainer(
        model=tiny_model(),
        args=args,
        train_dataset=Tokens(),
        eval_dataset=Tokens(16),
        callbacks=list(callbacks),
    )


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> transformers.Trainer:
    """An uninterrupted 4-epoch run (no MLflow, no callback), trained once for the module:
    both resume tests compare with it (each trained the same run before)."""
    trainer = make_trainer(tmp_path_factory.mktemp("straight"), 4)
    trainer.train()
    return trainer


# slow: two Trainer runs each (large for an in-process test); one worker for the pair under
# `make test` (--dist loadgroup), so the straight run is trained once.
@pytest.mark.slow
@pytest.mark.xdist_group("hf-straight")
@pytest.mark.parametrize("dst", [False, True], ids=["temporary", "dst"])
def test_resume_gives_the_same_weights_as_training_straight(
    tracking: str, tmp_path: Path, own_tempdir: Path, dst: bool, straight: transformers.Trainer
) -> None:
    # the first half: the schedule is for 4 epochs, stopped after 2 (as a killed job would be)
    callback = MlflowCheckpointCallback(async_save=False)
    half = make_trainer(tmp_path / "b", 4, callback)
    half.add_callback(_StopAfterEpochs(2))
    half.train()
    run_id = callback.run_id
    assert mlflow.active_run() is None
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run_id)] == [7, 3]

    path = mlflow_ckpt.resume_path(run_id, dst=tmp_path / "resume" if dst else None)
    assert (Path(path) / "rng_state.pth").is_file()
    torch.manual_seed(999)  # resume must not depend on the seed in force
    callback2 = MlflowCheckpointCallback(async_save=False)
    resumed = make_trainer(tmp_path / "c", 4, callback2)
    resumed.train(resume_from_checkpoint=path)

    assert callback2.run_id == run_id
    # a folder resume_path made is removed once read (after the first step); dst is kept
    assert Path(path).is_dir() == dst
    assert not list(own_tempdir.glob(f"{PREFIX}*"))
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


# ------------------------------------------------- alongside report_to="mlflow" / mlflow autolog
#
# The Trainer's MLflowCallback logs each ``on_log`` at ``state.global_step`` (1-based: the loss
# of the 4th optimizer step at step 4); our steps are 0-based, so a checkpoint of that step is
# step 3. With MLflow already logging, our callback logs nothing itself (``log_metrics=False``)
# and only links the values of its saved steps to their checkpoints, which MLflow records as
# one run-history entry per metric at the checkpoint's step. "Double-logged" here means a
# (key, step) pair written by both MLflow's callback and ours: with logging every 2 steps,
# MLflow writes the even steps and our checkpoints the odd ones, so every (key, step) must come
# from exactly one of the two, and ours only at checkpoint steps, once, with the value MLflow
# logged one step later.

REPORTED = {"logging_strategy": "steps", "logging_steps": 2}  # 4 optimizer steps per epoch


def metric_histories(run_id: str) -> dict[str, list[tuple[int, float]]]:
    client = MlflowClient()
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        for key in client.get_run(run_id).data.metrics
    }


def assert_no_double_logging(run_id: str, epochs: int) -> dict[str, list[tuple[int, float]]]:
    """Check the rule above for every metric key; return the histories."""
    saved = {c.step: c for c in mlflow_ckpt.list_checkpoints(run_id)}
    reported = set(range(2, 4 * epochs + 1, 2))  # where MLflowCallback logs (evaluations too)
    assert saved and saved.keys().isdisjoint(reported)
    histories = metric_histories(run_id)
    assert {"loss", "eval_loss", "learning_rate", "epoch"} <= histories.keys()
    for key, entries in histories.items():
        assert {step for step, _ in entries} <= reported | saved.keys(), key  # nothing else
        ours = [(step, value) for step, value in entries if step in saved]
        linked = [(step, c.metrics[key]) for step, c in sorted(saved.items()) if key in c.metrics]
        assert ours == linked, key  # one entry per checkpoint that has the metric, no more
        # total_flos: PrinterCallback drops it from the logs before a later MLflowCallback sees it
        if len(ours) < len(entries):  # MLflowCallback logged the key
            for step, value in ours:
                assert (step + 1, value) in entries, key  # the value MLflowCallback logged
    for ckpt in saved.values():
        assert {"loss", "learning_rate", "epoch"} <= ckpt.metrics.keys()
    return histories


def assert_best_by_eval_loss(run_id: str, histories: dict[str, list[tuple[int, float]]]) -> None:
    evaluated = [c for c in mlflow_ckpt.list_checkpoints(run_id) if "eval_loss" in c.metrics]
    assert evaluated
    best = mlflow_ckpt.best_checkpoint(run_id=run_id, metric="eval_loss")
    assert best is not None
    assert best.metrics["eval_loss"] == min(c.metrics["eval_loss"] for c in evaluated)
    logged_step, logged = min(histories["eval_loss"], key=lambda e: (e[1], -e[0]))
    assert best.metrics["eval_loss"] == logged and best.step in (logged_step, logged_step - 1)


def test_works_with_report_to_mlflow_without_double_logging(tracking: str, tmp_path: Path) -> None:
    callback = MlflowCheckpointCallback(monitor="eval_loss", async_save=False)
    with mlflow.start_run() as run:
        trainer = make_trainer(tmp_path, 3, callback, report_to=["mlflow"], **REPORTED)
        trainer.train()
        assert mlflow.active_run().info.run_id == run.info.run_id
    run_id = run.info.run_id
    assert callback.run_id == run_id
    assert MlflowClient().get_run(run_id).data.params["logging_steps"] == "2"  # HF logged here
    # eval_loss improves at each epoch end: saved at steps 3, 7, 11 (global steps 4, 8, 12)
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run_id)] == [11, 7, 3]
    histories = assert_no_double_logging(run_id, 3)
    steps = {key: [step for step, _ in entries] for key, entries in histories.items()}
    # MLflowCallback: loss every 2 steps, eval_loss per epoch; ours: one each per checkpoint.
    # Not logging per step ourselves: nothing at steps 1, 5, 9 (logged steps, not saved).
    assert steps["loss"] == [2, 3, 4, 6, 7, 8, 10, 11, 12]
    assert steps["eval_loss"] == [3, 4, 7, 8, 11, 12]
    # "epoch" is in every Trainer log (train, eval and the final summary): those repeats at
    # steps 4, 8, 12 are MLflowCallback's own; ours add one entry at 3, 7 and 11. The eval
    # log and the final summary at step 12 carry the same value and may fall in the same
    # millisecond, and MLflow stores identical (key, step, timestamp, value) entries once.
    assert [s for s in steps["epoch"] if s != 12] == [2, 3, 4, 4, 6, 7, 8, 8, 10, 11]
    assert steps["epoch"].count(12) in (2, 3)
    assert steps["train_runtime"] == [11, 12]  # the final summary log lands on the last step
    assert_best_by_eval_loss(run_id, histories)


def test_report_to_mlflow_starts_the_run_and_ours_joins_it(tracking: str, tmp_path: Path) -> None:
    # No active run: MLflowCallback (before ours in the callback list) starts one in
    # on_train_begin, our callback checkpoints into it, and MLflowCallback ends it in
    # on_train_end, before ours saves the last step and closes.
    mlflow_ckpt.autolog(monitor="eval_loss", save_every_n_steps=2, async_save=False)
    try:
        trainer = make_trainer(tmp_path, 2, report_to=["mlflow"], **REPORTED)
        trainer.train()
    finally:
        mlflow_ckpt.autolog(disable=True)
    assert mlflow.active_run() is None
    (callback,) = [
        cb for cb in trainer.callback_handler.callbacks if isinstance(cb, MlflowCheckpointCallback)
    ]
    runs = mlflow.search_runs(output_format="list")
    assert [r.info.run_id for r in runs] == [callback.run_id]  # one run, shared
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert not run.info.run_name.startswith("mlflow-ckpt-")  # MLflowCallback's, not ours
    assert run.data.params["logging_steps"] == "2"
    # step 7 is saved in our on_train_end, after MLflowCallback ended the run
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run.info.run_id)] == [7, 5, 3, 1]
    histories = assert_no_double_logging(run.info.run_id, 2)
    assert [step for step, _ in histories["eval_loss"]] == [3, 4, 7, 8]
    assert_best_by_eval_loss(run.info.run_id, histories)


def test_works_with_mlflow_transformers_autolog(tracking: str, tmp_path: Path) -> None:
    # mlflow.transformers.autolog() patches Trainer.train to add MLflowCallback (transformers
    # 5 no longer reports to installed integrations by default), after ours in the list: here
    # our callback starts the run, MLflowCallback logs into it and we end it.
    mlflow.transformers.autolog()
    try:
        callback = MlflowCheckpointCallback(monitor="eval_loss", async_save=False)
        trainer = make_trainer(tmp_path, 2, callback, **REPORTED)
        trainer.train()
    finally:
        mlflow.transformers.autolog(disable=True)
    names = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
    assert names.index("MlflowCheckpointCallback") < names.index("MLflowCallback")
    assert mlflow.active_run() is None
    runs = mlflow.search_runs(output_format="list")
    assert [r.info.run_id for r in runs] == [callback.run_id]
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.params["logging_steps"] == "2"
    assert [c.step for c in mlflow_ckpt.list_checkpoints(callback.run_id)] == [7, 3]
    histories = assert_no_double_logging(callback.run_id, 2)
    assert [step for step, _ in histories["loss"]] == [2, 3, 4, 6, 7, 8]
    assert_best_by_eval_loss(callback.run_id, histories)

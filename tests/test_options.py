"""What the manager is told is checked before anything happens; triggers and retention as
objects; values from NumPy/torch are accepted where they are plain numbers."""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Sequence
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

import mlflow_ckpt
from mlflow_ckpt.catalog import tags
from mlflow_ckpt.manager import KeepLastN, StepInfo
from mlflow_ckpt.manager.options import build_options, option_arguments


def small_state() -> dict[str, Any]:
    model = torch.nn.Linear(3, 2)
    return {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}


def _saved_run(steps: int = 2) -> tuple[str, dict[str, Any]]:
    state = small_state()
    with mlflow.start_run(run_name="saved") as run:
        with mlflow_ckpt.CheckpointManager(state, save_every_n_steps=1, async_save=False) as mgr:
            for step in range(steps):
                with torch.no_grad():
                    state["model"].weight.add_(1.0)
                mgr.step(step, {"loss": 1.0 / (step + 1)})
    return run.info.run_id, state


class _CountingState:
    """A Stateful that records every call, to prove nothing touched it."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.value = 0

    def state_dict(self) -> dict[str, int]:
        self.calls.append("state_dict")
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.calls.append("load_state_dict")
        self.value = state["value"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"save_every_n_steps": 0}, ValueError, "save_every_n_steps must be positive"),
        ({"save_every_n_steps": 2.5}, TypeError, "save_every_n_steps must be a int"),
        ({"mode": "best"}, ValueError, "mode must be 'min' or 'max'"),
        ({"keep_best_n": 2}, ValueError, "keep_best_n needs a metric"),
        ({"format": "pickle"}, ValueError, "format='pickle' is not supported"),
        ({"on_error": "ignore"}, ValueError, "on_error must be"),
        ({"async_save": "yes"}, TypeError, "async_save must be True or False"),
        ({"model_kwargs": {"f": object()}}, ValueError, "model_kwargs must be JSON"),
        ({"code_paths": ["/no/such/file.py"]}, ValueError, "code path /no/such/file.py"),
        ({"monitor": "x" * 300}, ValueError, "MLflow accepts at most 250"),
        ({"triggers": [object()]}, TypeError, "is not a trigger"),
        ({"retention": object()}, TypeError, "is not a retention policy"),
        ({"save_evry_n_steps": 5}, TypeError, "unexpected keyword argument.*save_evry_n_steps"),
    ],
)
def test_bad_arguments_to_resume_change_nothing(
    tracking: str, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    run_id, _ = _saved_run()
    client = MlflowClient()
    before = client.get_run(run_id).data.tags
    counting = _CountingState()
    fresh = small_state()
    weight = fresh["model"].weight.detach().clone()
    python_rng = __import__("random").getstate()
    with pytest.raises(error, match=match):
        mlflow_ckpt.CheckpointManager.resume(run_id, {**fresh, "extra": counting}, **kwargs)
    assert counting.calls == []  # not even state_dict(): the state check comes after
    assert torch.equal(fresh["model"].weight, weight)  # nothing restored
    assert __import__("random").getstate() == python_rng  # random streams untouched
    assert mlflow.active_run() is None  # no run started
    after = client.get_run(run_id).data.tags
    assert tags.RUN_WRITER not in after  # no lease taken
    assert after == before


def test_bad_arguments_to_the_constructor_take_no_lease(tracking: str) -> None:
    with mlflow.start_run(run_name="c") as run:
        with pytest.raises(ValueError, match="keep_last_n must be positive"):
            mlflow_ckpt.CheckpointManager(small_state(), keep_last_n=0)
        with pytest.raises(TypeError, match="must be a non-empty dict"):
            mlflow_ckpt.CheckpointManager({})
    assert tags.RUN_WRITER not in MlflowClient().get_run(run.info.run_id).data.tags


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"mode": "best"}, ValueError, "mode must be 'min' or 'max', not 'best'"),
        ({"on_error": "ignore"}, ValueError, "on_error must be 'raise' or 'warn', not 'ignore'"),
        (
            {"nonfinite": "nan"},
            ValueError,
            "nonfinite must be 'skip', 'save' or 'raise', not 'nan'",
        ),
        ({"timeline": "false"}, TypeError, "timeline must be True or False, not 'false'"),
        ({"incremental": 0}, TypeError, "incremental must be True or False, not 0"),
        ({"client": 5}, TypeError, "client must be a MlflowClient or None, not 5"),
        ({"transfer": "x"}, TypeError, "transfer must be a TransferConfig or None, not 'x'"),
        ({"archive_after_n": 0}, ValueError, "archive_after_n must be positive and finite, got 0"),
        ({"mtbf_hours": 2.0}, ValueError, "save_every_n_seconds='auto' and mtbf_hours= go"),
        ({"save_every_n_seconds": "auto"}, ValueError, "save_every_n_seconds='auto' and mtbf"),
        ({"spike_factor": 1.0, "monitor": "loss"}, ValueError, "spike_factor must be above 1"),
        ({"spike_factor": 2.0}, ValueError, "spike_factor needs a metric: pass monitor="),
        (
            {"spike_factor": 2.0, "monitor": "acc", "mode": "max"},
            ValueError,
            "spike_factor watches for a metric jumping up (a loss); monitor='acc' is maximised",
        ),
    ],
)
def test_each_check_names_the_keyword_and_what_it_accepts(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    """The checks are tables and small helpers; the messages a user sees are these."""
    args = option_arguments(inspect.signature(mlflow_ckpt.CheckpointManager.__init__), kwargs)
    with pytest.raises(error) as caught:
        build_options(args)
    assert str(caught.value).startswith(message)


def test_spike_watch_takes_the_monitored_metric_unless_named() -> None:
    signature = inspect.signature(mlflow_ckpt.CheckpointManager.__init__)
    options = build_options(option_arguments(signature, {"spike_factor": 3, "monitor": "loss"}))
    assert options.spike == ("loss", 3.0)
    named = {"spike_factor": 2.5, "spike_metric": "train_loss", "monitor": "acc", "mode": "max"}
    assert build_options(option_arguments(signature, named)).spike == ("train_loss", 2.5)
    assert build_options(option_arguments(signature, {})).spike is None


def test_state_is_encoded_once_on_resume(tracking: str) -> None:
    with mlflow.start_run(run_name="once") as run:
        with mlflow_ckpt.CheckpointManager({"extra": _CountingState()}, async_save=False) as mgr:
            mgr.save(0)
    counting = _CountingState()
    mgr = mlflow_ckpt.CheckpointManager.resume(run.info.run_id, {"extra": counting})
    assert counting.calls == ["state_dict", "load_state_dict"]  # checked once, restored once
    mgr.close()


def test_numpy_and_torch_integers_are_steps_and_metric_names_are_checked_at_the_call(
    tracking: str,
) -> None:
    with mlflow.start_run(run_name="n") as run:
        mgr = mlflow_ckpt.CheckpointManager(small_state(), save_every_n_steps=1, async_save=True)
        assert mgr.step(np.int64(0), {"loss": np.float32(0.5)}, epoch=np.int32(0))
        assert mgr.step(torch.tensor(1), {"loss": torch.tensor(0.25)})
        with pytest.raises(ValueError, match="MLflow accepts at most 250"):
            mgr.step(2, {"x" * 300: 1.0})
        with pytest.raises(ValueError, match="not accepted by MLflow"):
            mgr.save(2, {"bad*name": 1.0})
        mgr.close()
    ckpts = mlflow_ckpt.list_checkpoints(run.info.run_id)
    assert [(c.step, c.epoch, c.metrics) for c in ckpts] == [
        (1, None, {"loss": 0.25}),
        (0, 0, {"loss": 0.5}),
    ]
    history = MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.5), (1, 0.25)]


class EveryOddStep:
    """A user's own trigger: only ``name`` and ``fires`` (no state to carry)."""

    name = "odd"

    def fires(self, info: StepInfo) -> bool:
        return info.step % 2 == 1


class LossDrop:
    """A user's own stateful trigger: saves when the loss halves since the last save."""

    name = "loss_drop"

    def __init__(self) -> None:
        self.reference: float | None = None

    def fires(self, info: StepInfo) -> bool:
        loss = info.metrics.get("loss")
        return loss is not None and (self.reference is None or loss <= self.reference / 2)

    def observe(self, info: StepInfo) -> None:
        if self.fires(info):
            self.reference = info.metrics["loss"]

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference = state["reference"]


class KeepMultiplesOfFour:
    """A user's own retention rule: keep steps divisible by 4 (returns a list, not a set)."""

    def keep(self, checkpoints: Sequence[mlflow_ckpt.Checkpoint]) -> list[str]:
        return [c.model_id for c in checkpoints if c.step % 4 == 0]


def test_user_defined_trigger_and_retention_objects_work_end_to_end(tracking: str) -> None:
    state = small_state()
    losses = [1.0, 0.9, 0.5, 0.4, 0.3, 0.2, 0.15, 0.1, 0.09]
    with mlflow.start_run(run_name="objects") as run:
        mgr = mlflow_ckpt.CheckpointManager(
            state,
            triggers=[EveryOddStep(), LossDrop()],
            retention=KeepMultiplesOfFour(),
            save_last=False,
        )
        fired = {s: mgr.step(s, {"loss": loss}) for s, loss in enumerate(losses[:6])}
        mgr.close()
    run_id = run.info.run_id
    # odd steps 1, 3, 5; loss halvings at 0 (1.0), 2 (0.5), 5 (0.2)
    assert [s for s, f in fired.items() if f] == [0, 1, 2, 3, 5]
    kept = mlflow_ckpt.list_checkpoints(run_id)
    # retention kept step 0 (multiple of 4) and the newest (5), deleted 1, 2, 3
    assert [(c.step, c.triggers) for c in kept] == [(5, ("odd", "loss_drop")), (0, ("loss_drop",))]

    # the stateful trigger's memory survives a resume: 0.15 is not half of 0.2, 0.1 is
    resumed = mlflow_ckpt.CheckpointManager.resume(
        run_id,
        small_state(),
        triggers=[EveryOddStep(), LossDrop()],
        retention=KeepMultiplesOfFour(),
        save_last=False,
    )
    assert resumed.start_step == 6
    assert resumed.step(6, {"loss": 0.15}) is False
    assert resumed.step(7, {"loss": 0.1}) is True  # odd and a halving
    resumed.step(8, {"loss": 0.09})
    resumed.close()
    mlflow.end_run()
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run_id)] == [7, 0]


def test_trigger_objects_combine_with_the_flat_keywords(tracking: str) -> None:
    with mlflow.start_run(run_name="both") as run:
        mgr = mlflow_ckpt.CheckpointManager(
            small_state(),
            triggers=[EveryOddStep()],
            save_every_n_steps=3,
            keep_last_n=1,
            retention=KeepLastN(2),
            save_last=False,
        )
        for step in range(6):
            mgr.step(step)
        mgr.close()
    saved = [(c.step, c.triggers) for c in mlflow_ckpt.list_checkpoints(run.info.run_id)]
    assert saved == [(5, ("odd", "periodic")), (3, ("odd",))]  # KeepLastN(2) or keep_last_n=1
    with mlflow.start_run(run_name="clash"):
        with pytest.raises(ValueError, match="two triggers are named 'periodic'"):
            mlflow_ckpt.CheckpointManager(
                small_state(),
                triggers=[mlflow_ckpt.manager.EveryNSteps(5)],
                save_every_n_steps=3,
            )


def test_checkpoints_carry_step_epoch_trigger_and_format_as_params(tracking: str) -> None:
    with mlflow.start_run(run_name="params") as run:
        with mlflow_ckpt.CheckpointManager(small_state(), save_every_n_epochs=1) as mgr:
            mgr.step(0, epoch=0, end_of_epoch=True)
            mgr.step(1)
    models = MlflowClient().search_logged_models([run.info.experiment_id])
    params = sorted((m.params for m in models), key=lambda p: int(p["step"]))
    assert params == [
        {"step": "0", "epoch": "0", "trigger": "epoch", "format": "safetensors"},
        {"step": "1", "epoch": "", "trigger": "last", "format": "safetensors"},
    ]


def test_metric_values_must_be_numbers(tracking: str) -> None:
    with mlflow.start_run(run_name="v"):
        with mlflow_ckpt.CheckpointManager(small_state()) as mgr:
            with pytest.raises(TypeError, match="must be a number"):
                mgr.step(0, {"loss": "low"})
            assert mgr.step(0, {"loss": math.inf}) is False


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_preempt_grace_none_means_the_default() -> None:
    from mlflow_ckpt.manager.preemption import DEFAULT_GRACE_S

    signature = inspect.signature(mlflow_ckpt.CheckpointManager.__init__)
    given = option_arguments(signature, {"preempt_grace_s": None})
    assert build_options(given).preempt_grace_s == DEFAULT_GRACE_S
    assert build_options(option_arguments(signature, {"preempt_grace_s": 5})).preempt_grace_s == 5.0

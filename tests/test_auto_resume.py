"""``resume="auto"``: the job finds its own run by a key the restarted command still holds.

In-process tests of the key, the lookup and every refusal; ``tests/test_preemption.py``
restarts real processes (kill -9, SIGTERM, racing first starts, another host's lease).
"""

from __future__ import annotations

import random
import signal
import threading
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import ViewType

import mlflow_ckpt
from mlflow_ckpt.catalog import tags
from mlflow_ckpt.errors import CheckpointError
from mlflow_ckpt.manager import job
from mlflow_ckpt.manager.job import job_key
from mlflow_ckpt.manager.preemption import parse_signals

JOB_ENV = ("MLFLOW_CKPT_RUN_KEY", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID")


@pytest.fixture(autouse=True)
def _no_job_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests start with no job identity in the environment (CI could run under SLURM), and
    a short settle time for new runs (its length matters only to racing processes)."""
    for name in JOB_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(job, "CREATE_SETTLE_S", 0.05)


def _state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    return {"model": model, "optimizer": torch.optim.AdamW(model.parameters(), lr=0.1)}


def _train(manager: mlflow_ckpt.CheckpointManager, state: dict[str, Any], stop: int) -> None:
    model, opt = state["model"], state["optimizer"]
    for step in range(manager.start_step, stop):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        manager.step(step, {"loss": loss.item()})


def _runs_with_key(key: str, view: int = ViewType.ACTIVE_ONLY) -> list[Any]:
    experiment = mlflow.get_experiment_by_name("tests").experiment_id
    return MlflowClient().search_runs(
        [experiment], f"tags.`{tags.RUN_KEY}` = '{key}'", run_view_type=view
    )


def test_the_same_job_continues_its_own_run_and_leaves_it_active(tracking: str) -> None:
    state = _state()
    first = mlflow_ckpt.CheckpointManager(
        state, resume="auto", run_name="job-a", save_every_n_steps=2, async_save=False
    )
    run_id = first.run_id
    assert mlflow.active_run().info.run_id == run_id  # the user's own log_* calls land here
    mlflow.log_param("lr", 0.1)
    assert first.start_step == 0 and first.resumed_from is None
    _train(first, state, 5)
    first.close()
    mlflow.end_run()
    run = MlflowClient().get_run(run_id)
    assert run.info.run_name == "job-a" and run.data.tags[tags.RUN_KEY] == "job-a"
    assert run.data.params["lr"] == "0.1"
    assert tags.RUN_RESUMES not in run.data.tags  # a new job's run was not resumed

    again = _state()
    second = mlflow_ckpt.CheckpointManager(
        again, resume="auto", run_name="job-a", save_every_n_steps=2, async_save=False
    )
    assert second.run_id == run_id and second.start_step == 5 and second.resumed_from.step == 4
    assert mlflow.active_run().info.run_id == run_id
    for key, value in state["model"].state_dict().items():
        assert torch.equal(again["model"].state_dict()[key], value), key
    _train(second, again, 7)
    second.close()
    mlflow.end_run()
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run_id)] == [6, 5, 4, 3, 1]
    assert len(_runs_with_key("job-a")) == 1
    assert MlflowClient().get_run(run_id).data.tags[tags.RUN_RESUMES] == "1"


def test_a_finished_run_is_resumed_and_runs_no_more_steps(tracking: str) -> None:
    state = _state()
    with mlflow_ckpt.CheckpointManager(state, resume="auto", run_name="done-job") as mgr:
        _train(mgr, state, 3)
    mlflow.end_run()
    again = mlflow_ckpt.CheckpointManager(_state(), resume="auto", run_name="done-job")
    assert again.start_step == 3  # range(start_step, 3) is empty: nothing is trained again
    again.close()
    mlflow.end_run()
    assert [c.step for c in mlflow_ckpt.list_checkpoints(again.run_id)] == [2]


def test_an_empty_run_of_the_job_is_reopened_at_step_zero(tracking: str) -> None:
    with mlflow.start_run(run_name="early", tags={tags.RUN_KEY: "early"}) as run:
        pass  # killed before its first checkpoint
    mgr = mlflow_ckpt.CheckpointManager(_state(), resume="auto", run_name="early")
    assert mgr.run_id == run.info.run_id and mgr.start_step == 0
    assert mlflow.active_run().info.run_id == run.info.run_id
    mgr.close()


@pytest.mark.parametrize(
    ("env", "run_name", "expected", "source"),
    [
        ({"MLFLOW_CKPT_RUN_KEY": "k1", "SLURM_JOB_ID": "7"}, "named", "named", "run_name="),
        ({"MLFLOW_CKPT_RUN_KEY": "k1", "TORCHELASTIC_RUN_ID": "r"}, None, "k1", "MLFLOW_"),
        ({"TORCHELASTIC_RUN_ID": "abc", "SLURM_JOB_ID": "7"}, None, "torchelastic-abc", "TORCH"),
        ({"TORCHELASTIC_RUN_ID": "none", "SLURM_JOB_ID": "7"}, None, "slurm-7", "SLURM"),
        ({"SLURM_JOB_ID": "42", "SLURM_ARRAY_TASK_ID": "3"}, None, "slurm-42_3", "SLURM"),
    ],
)
def test_the_key_is_the_first_identity_that_is_set(
    env: dict[str, str], run_name: str | None, expected: str, source: str
) -> None:
    key = job_key(run_name, env)
    assert key.value == expected and key.source.startswith(source)


def test_no_identity_says_which_to_set() -> None:
    with pytest.raises(ValueError, match=r"run_name=.*MLFLOW_CKPT_RUN_KEY.*--rdzv-id.*SLURM"):
        job_key(None, {"TORCHELASTIC_RUN_ID": "none"})


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"resume": "auto", "run_name": ""}, ValueError, "from run_name= is empty"),
        ({"resume": "auto", "run_name": "x" * 251}, ValueError, "at most 250"),
        ({"resume": "auto", "run_name": "it's"}, ValueError, "cannot name an MLflow run"),
        ({"resume": "auto", "run_name": "a\nb"}, ValueError, "cannot name an MLflow run"),
        ({"resume": "auto"}, ValueError, "none is set: pass run_name="),
        ({"resume": "yes"}, ValueError, "resume must be None or 'auto'"),
        ({"run_name": "job"}, TypeError, "pass resume='auto' too"),
        ({"resume": "auto", "run_id": "0123"}, TypeError, "not both"),
        ({"resume": "auto", "run_name": "j", "save_on_signals": "SIGKILL"}, ValueError, "caught"),
        ({"resume": "auto", "run_name": "j", "save_on_signals": "NOPE"}, ValueError, "not a sig"),
        ({"resume": "auto", "run_name": "j", "preempt_grace_s": 0}, ValueError, "positive"),
    ],
)
def test_bad_job_arguments_are_refused_before_anything_is_opened(
    tracking: str, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    experiment = mlflow.get_experiment_by_name("tests").experiment_id
    with pytest.raises(error, match=match):
        mlflow_ckpt.CheckpointManager(_state(), **kwargs)
    assert mlflow.active_run() is None
    assert MlflowClient().search_runs([experiment], run_view_type=ViewType.ALL) == []


def test_resume_by_id_refuses_the_job_arguments(tracking: str) -> None:
    with pytest.raises(TypeError, match="belong to CheckpointManager"):
        mlflow_ckpt.CheckpointManager.resume("0" * 32, _state(), resume="auto")


def test_another_active_run_is_refused_with_what_to_do(tracking: str) -> None:
    with mlflow.start_run() as run:
        with pytest.raises(CheckpointError, match=f"run {run.info.run_id} .* is active.*Remove"):
            mlflow_ckpt.CheckpointManager(_state(), resume="auto", run_name="mine")
    assert _runs_with_key("mine") == []


def test_the_jobs_own_active_run_is_used(tracking: str) -> None:
    first = mlflow_ckpt.CheckpointManager(_state(), resume="auto", run_name="same")
    first.close()  # the run stays active: a second manager of the job in this process
    second = mlflow_ckpt.CheckpointManager(_state(), resume="auto", run_name="same")
    assert second.run_id == first.run_id
    second.close()


def test_several_runs_with_the_key_are_named(tracking: str) -> None:
    ids = []
    for name in ("copy-1", "copy-2"):
        with mlflow.start_run(run_name=name, tags={tags.RUN_KEY: "twice"}) as run:
            ids.append(run.info.run_id)
    with pytest.raises(CheckpointError, match=f"{ids[0]}|{ids[1]}") as info:
        mlflow_ckpt.CheckpointManager(_state(), resume="auto", run_name="twice")
    assert all(run_id in str(info.value) for run_id in ids)
    assert "cannot tell which" in str(info.value)
    assert mlflow.active_run() is None


def test_a_checkpoint_that_does_not_fit_changes_nothing(tracking: str) -> None:
    state = _state()
    with mlflow_ckpt.CheckpointManager(state, resume="auto", run_name="fit") as mgr:
        _train(mgr, state, 2)
    mlflow.end_run()
    other = {"model": torch.nn.Linear(5, 3)}
    before = {k: v.clone() for k, v in other["model"].state_dict().items()}
    python_state = random.getstate()
    with pytest.raises(mlflow_ckpt.StateMismatchError, match="model"):
        mlflow_ckpt.CheckpointManager(other, resume="auto", run_name="fit")
    assert all(torch.equal(before[k], v) for k, v in other["model"].state_dict().items())
    assert random.getstate() == python_state
    assert mlflow.active_run() is None  # the run was not reopened
    lease = MlflowClient().get_run(mgr.run_id).data.tags.get(tags.RUN_WRITER)
    assert lease is None  # ...and its lease given back


def test_a_new_job_run_does_not_move_the_random_streams(tracking: str) -> None:
    state = _state()
    random.seed(3)
    np.random.seed(3)
    expected = (random.random(), float(np.random.random()))
    random.seed(3)
    np.random.seed(3)
    mgr = mlflow_ckpt.CheckpointManager(state, resume="auto", run_name="rng")
    assert (random.random(), float(np.random.random())) == expected
    mgr.close()


def test_signals_are_parsed_by_name_number_or_enum() -> None:
    assert parse_signals(("SIGTERM", "usr1", signal.SIGUSR2, int(signal.SIGINT))) == (
        signal.SIGTERM,
        signal.SIGUSR1,
        signal.SIGUSR2,
        signal.SIGINT,
    )
    assert parse_signals("TERM") == (signal.SIGTERM,)
    assert parse_signals(None) == ()
    with pytest.raises(TypeError):
        parse_signals([1.5])


def test_sigterm_is_watched_by_default_with_resume_auto_only(tracking: str) -> None:
    before = signal.getsignal(signal.SIGTERM)
    plain = mlflow_ckpt.CheckpointManager(_state(), resume="auto", run_name="sig", timeline=False)
    assert signal.getsignal(signal.SIGTERM) != before  # ours now
    plain.close()
    assert signal.getsignal(signal.SIGTERM) == before  # given back
    mlflow.end_run()
    with mlflow.start_run():
        mgr = mlflow_ckpt.CheckpointManager(_state())
        assert signal.getsignal(signal.SIGTERM) == before  # not without resume="auto"
        mgr.close()


def test_a_previous_handler_runs_after_the_emergency_save_and_training_goes_on(
    tracking: str,
) -> None:
    seen: list[tuple[int, list[int]]] = []
    state = _state()

    def previous(signum: int, frame: Any) -> None:  # a framework's flag-setting handler
        committed = [c.step for c in mlflow_ckpt.list_checkpoints(mgr.run_id)]
        seen.append((signum, committed))

    old = signal.signal(signal.SIGUSR1, previous)
    try:
        with mlflow.start_run():
            mgr = mlflow_ckpt.CheckpointManager(
                state, save_on_signals=["SIGUSR1"], save_every_n_steps=100
            )
            _train(mgr, state, 3)
            signal.raise_signal(signal.SIGUSR1)
            assert seen == []  # the handler only recorded it
            _train_one(mgr, state, 3)
            assert seen == [(signal.SIGUSR1, [3])]  # called once step 3 was committed
            (ckpt,) = mlflow_ckpt.list_checkpoints(mgr.run_id)
            assert ckpt.triggers == (tags.PREEMPTED,) and ckpt.step == 3
            assert signal.getsignal(signal.SIGUSR1) == previous  # given back after the save
            _train_one(mgr, state, 4)  # the previous handler returned: training goes on
            assert seen == [(signal.SIGUSR1, [3])]  # step 4 is an ordinary step
            assert mlflow_ckpt.latest_checkpoint(mgr.run_id).step == 3
            mgr.close()
    finally:
        signal.signal(signal.SIGUSR1, old)


def _train_one(mgr: mlflow_ckpt.CheckpointManager, state: dict[str, Any], step: int) -> None:
    loss = state["model"](torch.randn(8, 4)).pow(2).mean()
    state["optimizer"].zero_grad()
    loss.backward()
    state["optimizer"].step()
    mgr.step(step, {"loss": loss.item()})


def test_an_ignored_signal_saves_and_goes_on(tracking: str) -> None:
    old = signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    state = _state()
    try:
        with mlflow.start_run():
            mgr = mlflow_ckpt.CheckpointManager(state, save_on_signals="SIGUSR2")
            _train_one(mgr, state, 0)
            signal.raise_signal(signal.SIGUSR2)
            _train_one(mgr, state, 1)
            assert mlflow_ckpt.latest_checkpoint(mgr.run_id).triggers == (tags.PREEMPTED,)
            _train_one(mgr, state, 2)  # an ordinary step again
            mgr.close()
        saved = [(c.step, c.triggers) for c in mlflow_ckpt.list_checkpoints(mgr.run_id)]
        assert saved == [(2, ("last",)), (1, (tags.PREEMPTED,))]
    finally:
        signal.signal(signal.SIGUSR2, old)


def test_off_the_main_thread_a_warning_says_the_signal_is_not_handled(tracking: str) -> None:
    before = signal.getsignal(signal.SIGTERM)
    caught: list[Any] = []

    def build() -> None:
        with pytest.warns(UserWarning, match="only be installed from the main thread") as w:
            mgr = mlflow_ckpt.CheckpointManager(_state(), resume="auto", run_name="thread")
        caught.extend(w)
        mgr.close()

    thread = threading.Thread(target=build)
    thread.start()
    thread.join()
    assert caught and signal.getsignal(signal.SIGTERM) == before

"""``fork``: a new run from any checkpoint, its history continuing the source's, the source
untouched; continuing it ends bit for bit where the source ended."""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient
from safetensors.torch import load_file

import mlflow_ckpt
from mlflow_ckpt.catalog import lineage, tags
from mlflow_ckpt.cli import main
from mlflow_ckpt.errors import CheckpointError, StateMismatchError
from mlflow_ckpt.storage import local_path_of
from tests import forkcrash
from tests.distlib import reports, torchrun
from tests.test_examples import run_example
from tests.test_resume_bitwise import _assert_same
from tests.train_script import build, dump, train_steps

STEPS = 40
EVERY = 5
FORK_AT = 19  # a checkpoint of the source (steps 4, 9, 14, ...)


def _train_source(tmp_path: Path) -> str:
    """A run of STEPS steps with a param, a user tag and a checkpoint every EVERY steps;
    its end state is dumped to ``tmp_path/a.pt``."""
    random.seed(7)
    np.random.seed(7)
    state = build(STEPS)
    with mlflow.start_run(run_name="source") as run:
        mlflow.log_param("lr", "0.01")
        mlflow.set_tag("team", "vision")
        manager = mlflow_ckpt.CheckpointManager(state, save_every_n_steps=EVERY)
        train_steps(state, manager, 0, STEPS, steps_per_epoch=10)
        manager.close()
    dump(state, tmp_path / "a.pt")
    return run.info.run_id


def _at(run_id: str, step: int) -> mlflow_ckpt.Checkpoint:
    return next(c for c in mlflow_ckpt.list_checkpoints(run_id) if c.step == step)


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float, int]]:
    points = client.get_metric_history(run_id, key)
    return sorted((m.step, m.value, m.timestamp) for m in points)


def _record(client: MlflowClient, run_id: str) -> dict[str, object]:
    """What must not change on the source: its data, its checkpoints and their metrics."""
    run = client.get_run(run_id)
    models = {
        c.model_id: (c.step, c.metrics, c.shared) for c in mlflow_ckpt.list_checkpoints(run_id)
    }
    return {
        "params": run.data.params,
        "tags": {k: v for k, v in run.data.tags.items() if k != tags.RUN_WRITER},
        "history": {k: _history(client, run_id, k) for k in run.data.metrics},
        "models": models,
    }


def _scramble() -> None:
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)


@pytest.mark.slow
def test_fork_then_training_to_the_end_equals_the_source_bit_for_bit(
    tracking: str, tmp_path: Path
) -> None:
    client = MlflowClient()
    source_id = _train_source(tmp_path)
    before = _record(client, source_id)
    _scramble()  # the fork restores every random stream from the checkpoint

    state = build(STEPS)
    manager = mlflow_ckpt.fork(
        _at(source_id, FORK_AT), state, run_name="branch", save_every_n_steps=EVERY
    )
    assert manager.start_step == FORK_AT + 1
    assert manager.resumed_from is not None and manager.resumed_from.run_id == source_id
    fork_id = manager.run_id
    assert mlflow.active_run().info.run_id == fork_id
    train_steps(state, manager, manager.start_step, STEPS, steps_per_epoch=10)
    manager.close()
    mlflow.end_run()
    dump(state, tmp_path / "b.pt")
    _assert_same(tmp_path / "a.pt", tmp_path / "b.pt")

    # the fork's history: every step once, its first FORK_AT + 1 steps the source's own
    for key in ("train_loss", "val_loss"):
        ours, theirs = _history(client, fork_id, key), _history(client, source_id, key)
        assert [s for s, _, _ in ours] == list(range(STEPS)), key
        assert ours[: FORK_AT + 1] == theirs[: FORK_AT + 1], key
        assert [v for _, v, _ in ours] == [v for _, v, _ in theirs], key  # bit for bit
    fork_run = client.get_run(fork_id)
    assert fork_run.info.run_name == "branch"
    assert fork_run.data.params["lr"] == "0.01"
    assert fork_run.data.tags["team"] == "vision"
    assert fork_run.data.tags[tags.PARENT_RUN] == source_id
    assert fork_run.data.tags[tags.FORKED_FROM] == _at(source_id, FORK_AT).uri
    assert fork_run.data.tags[tags.FORKED_FROM_STEP] == str(FORK_AT)
    assert fork_run.data.tags[tags.FORK_STATUS] == tags.READY
    # the source is exactly as it was
    assert _record(client, source_id) == before

    # the fork's checkpoints hold no byte of the source's: with every file of the source
    # gone (its run's shared area and its checkpoints' folders, as after retention and
    # `mlflow gc`), each of the fork's checkpoints still verifies and loads
    for path in [source_run_artifacts(client, source_id)] + [
        local_path_of(c.artifact_location) for c in mlflow_ckpt.list_checkpoints(source_id)
    ]:
        assert path is not None
        shutil.rmtree(path)
    own = mlflow_ckpt.list_checkpoints(fork_id)
    assert [c.step for c in own] == list(range(STEPS - 1, FORK_AT, -EVERY))
    for ckpt in own:
        mlflow_ckpt.load_training_state(ckpt)


def source_run_artifacts(client: MlflowClient, run_id: str) -> Path:
    path = local_path_of(client.get_run(run_id).info.artifact_uri or "")
    assert path is not None and path.is_dir()
    return path


def test_a_fork_resumes_from_its_source_until_it_saves(tracking: str, tmp_path: Path) -> None:
    """``mlflow-ckpt fork`` makes the run; ``CheckpointManager.resume`` of it restores the
    branch point (any training command, any world size, can go on from there)."""
    source_id = _train_source(tmp_path)
    uri = _at(source_id, FORK_AT).uri
    result = CliRunner().invoke(
        main, ["fork", uri, "--run-name", "lower-lr", "--param", "lr=0.001"]
    )
    assert result.exit_code == 0, result.output
    fork_id = result.output.split("into run ")[1].split()[0]
    assert f"CheckpointManager.resume({fork_id!r}, state)" in result.output
    run = MlflowClient().get_run(fork_id)
    assert run.data.params["lr"] == "0.001"
    assert run.info.run_name == "lower-lr"
    assert mlflow_ckpt.list_checkpoints(fork_id) == []

    state = build(STEPS)
    manager = mlflow_ckpt.CheckpointManager.resume(fork_id, state)
    assert manager.start_step == FORK_AT + 1
    assert manager.resumed_from is not None and manager.resumed_from.uri == uri
    expected = mlflow_ckpt.load_training_state(uri)["model"]
    for key, tensor in state["model"].state_dict().items():
        assert torch.equal(tensor, expected[key]), key
    manager.close()
    mlflow.end_run()


def test_a_fork_of_a_fork_is_a_chain(tracking: str, tmp_path: Path) -> None:
    client = MlflowClient()
    source_id = _train_source(tmp_path)
    state = build(STEPS)
    first = mlflow_ckpt.fork(_at(source_id, FORK_AT), state, save_every_n_steps=EVERY)
    train_steps(state, first, first.start_step, 30, steps_per_epoch=10)
    first.close()
    mlflow.end_run()

    state = build(STEPS)
    second = mlflow_ckpt.fork(_at(first.run_id, 24), state, save_every_n_steps=EVERY)
    assert second.start_step == 25
    second.close()
    mlflow.end_run()
    run = client.get_run(second.run_id)
    assert run.data.tags[tags.PARENT_RUN] == first.run_id
    assert run.info.run_name == f"{first_name(client, first.run_id)}-fork-24"
    steps = [s for s, _, _ in _history(client, second.run_id, "train_loss")]
    assert steps == list(range(25))
    assert (
        _history(client, second.run_id, "train_loss")[:20]
        == _history(client, source_id, "train_loss")[:20]
    )


def first_name(client: MlflowClient, run_id: str) -> str:
    return client.get_run(run_id).info.run_name


def test_a_state_that_does_not_fit_leaves_no_fork(tracking: str, tmp_path: Path) -> None:
    client = MlflowClient()
    source_id = _train_source(tmp_path)
    before = _record(client, source_id)
    wrong = {"model": torch.nn.Linear(3, 3)}
    with pytest.raises(StateMismatchError):
        mlflow_ckpt.fork(_at(source_id, FORK_AT), wrong)
    assert mlflow.active_run() is None
    visible = client.search_runs([client.get_run(source_id).info.experiment_id])
    assert [r.info.run_id for r in visible] == [source_id]
    assert _record(client, source_id) == before


def test_fork_refuses_before_making_anything(tracking: str, tmp_path: Path) -> None:
    client = MlflowClient()
    source_id = _train_source(tmp_path)
    ckpt = _at(source_id, FORK_AT)
    with pytest.raises(TypeError, match="run_id"):
        mlflow_ckpt.fork(ckpt, build(STEPS), run_id=source_id)
    with pytest.raises(ValueError, match="keep_last_n"):
        mlflow_ckpt.fork(ckpt, build(STEPS), keep_last_n=-1)
    with mlflow.start_run() as other, pytest.raises(CheckpointError, match=other.info.run_id):
        mlflow_ckpt.fork(ckpt, build(STEPS))
    experiment = client.get_run(source_id).info.experiment_id
    assert {r.info.run_id for r in client.search_runs([experiment])} == {
        source_id,
        other.info.run_id,
    }


def test_an_incomplete_fork_is_never_resumed_and_the_next_fork_deletes_it(
    tracking: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a fork killed while copying leaves (made here by its first step alone: the
    kill -9 itself is in tests/test_crash.py): a run tagged ``copying``."""
    client = MlflowClient()
    source_id = _train_source(tmp_path)
    ckpt = _at(source_id, FORK_AT)
    experiment = client.get_run(source_id).info.experiment_id
    half = client.create_run(
        experiment,
        run_name="x (copying)",
        tags={
            tags.FORKED_FROM: ckpt.uri,
            tags.FORK_STATUS: tags.COPYING,
            tags.FORK_HEARTBEAT: "0",
        },
    ).info.run_id
    with pytest.raises(CheckpointError, match="incomplete fork"):
        mlflow_ckpt.CheckpointManager.resume(half, build(STEPS))
    manager = mlflow_ckpt.fork(ckpt, build(STEPS))
    manager.close()
    mlflow.end_run()
    assert client.get_run(half).info.lifecycle_stage == "deleted"
    visible = {r.info.run_id for r in client.search_runs([experiment])}
    assert visible == {source_id, manager.run_id}
    assert lineage.ABANDONED_AFTER_S > 10  # a live copy beats far more often than this


@pytest.mark.slow
def test_kill9_while_copying_leaves_a_marked_run_never_resumed_and_the_retry_cleans_it(
    tracking: str,
) -> None:
    """The kill -9 harness (tests/forkcrash.py; `make faults` runs it at random moments)."""
    source = forkcrash.make_source(3_000)
    before = source.history(MlflowClient())
    assert forkcrash.kill_when_copying(source), "the fork finished before it could be killed"
    lost, problems = forkcrash.check(source, before)
    assert lost == [] and problems == []
    runs = forkcrash.forks(MlflowClient(), source)
    assert len(runs) == 1 and runs[0].data.tags[tags.FORK_STATUS] == tags.READY


@pytest.mark.slow
def test_the_fork_after_spike_example(tmp_path: Path) -> None:
    out = run_example("fork_after_spike.py", tmp_path)
    kept = re.search(r"kept checkpoints: (.*)", out)
    assert kept is not None, out
    assert "step 39 (pre_spike)" in kept.group(1), out
    assert re.search(r"^forked at step 39 into run \w+; goes on at 40$", out, re.M), out
    source = float(re.search(r"source run \w+: final loss ([\d.]+)", out).group(1))  # type: ignore[union-attr]
    fork = float(re.search(r"fork run \w+: final loss ([\d.]+)", out).group(1))  # type: ignore[union-attr]
    assert fork < source, out  # the lower restart rate did better
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mlflow-ckpt-fork").experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([experiment])}
    assert runs["restart-lower"].data.tags[tags.PARENT_RUN] == runs["restart-too-high"].info.run_id
    assert runs["restart-lower"].data.params["restart_lr"] == "0.02"


@pytest.mark.slow
def test_a_fork_made_once_continues_on_two_fsdp2_ranks_bit_for_bit(
    tracking: str, tmp_path: Path
) -> None:
    """`mlflow-ckpt fork`, then `CheckpointManager.resume(fork_run_id)` on every rank: the
    sharded state comes from the source's checkpoint, the first save is the fork's own."""
    common = ["--strategy", "fsdp2", "--steps", "6", "--save-every", "3"]
    torchrun(2, tmp_path / "straight", *common)  # saves steps 2 and 5
    source_id = reports(tmp_path / "straight")[0]["run_id"]
    branch = _at(source_id, 2)
    result = CliRunner().invoke(main, ["fork", branch.uri, "--json"])
    assert result.exit_code == 0, result.output
    fork_id = json.loads(result.output)["run_id"]
    torchrun(2, tmp_path / "fork", *common, "--resume", fork_id)
    assert [r["start_step"] for r in reports(tmp_path / "fork")] == [3, 3]
    for name in ("final.safetensors", "local-0.safetensors", "local-1.safetensors"):
        want, got = load_file(tmp_path / "straight" / name), load_file(tmp_path / "fork" / name)
        assert want.keys() == got.keys()
        for key in want:
            assert torch.equal(want[key], got[key]), (name, key)
    assert [r["rng"] for r in reports(tmp_path / "straight")] == [
        r["rng"] for r in reports(tmp_path / "fork")
    ]
    own = mlflow_ckpt.list_checkpoints(fork_id)
    assert [c.step for c in own] == [5]
    assert set(own[0].shared) <= {own[0].model_id}  # nothing of the source referenced
    mlflow_ckpt.load_training_state(own[0])  # a plain process reads the fork's own shards


def test_gc_of_the_source_deletes_its_abandoned_forks(tracking: str, tmp_path: Path) -> None:
    """A fork killed while copying is also cleaned by `mlflow-ckpt gc` of its source run;
    a copy whose heartbeat is recent (a live one) is left alone."""
    client = MlflowClient()
    source_id = _train_source(tmp_path)
    ckpt = _at(source_id, FORK_AT)
    experiment = client.get_run(source_id).info.experiment_id

    def half_made(beat: str) -> str:
        run_tags = {
            tags.FORKED_FROM: ckpt.uri,
            tags.FORKED_FROM_RUN: source_id,
            tags.FORK_STATUS: tags.COPYING,
            tags.FORK_HEARTBEAT: beat,
        }
        return client.create_run(experiment, run_name="x (copying)", tags=run_tags).info.run_id

    dead, live = half_made("0"), half_made(str(time.time()))
    dry = CliRunner().invoke(main, ["gc", source_id, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert f"would delete run {dead} (an incomplete fork of this run)" in dry.output
    assert client.get_run(dead).info.lifecycle_stage == "active"
    result = CliRunner().invoke(main, ["gc", source_id])
    assert result.exit_code == 0, result.output
    assert f"deleted run {dead}" in result.output and live not in result.output
    assert client.get_run(dead).info.lifecycle_stage == "deleted"
    assert client.get_run(live).info.lifecycle_stage == "active"

"""``evaluate``: a new benchmark scored on kept checkpoints, logged at their steps and linked.

Real sqlite tracking store and local artifacts; the checkpoints are saved by the manager.
Each checkpoint's first bias holds its "score", deliberately not monotonic in the step, so
a test that finds the best checkpoint by the new metric proves each value reached its own
checkpoint.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from mlflow import MlflowClient

import mlflow_ckpt
from mlflow_ckpt.after_training.evaluation import (
    EVALUATED,
    EvaluationResult,
    evaluate,
    evaluation_name,
)
from mlflow_ckpt.errors import EvaluationError
from mlflow_ckpt.storage import local_path_of
from tests.test_examples import run_example
from tests.train_script import Net

SCORES = [0.3, 0.9, 0.1, 0.5, 0.7]  # step -> score: best max at step 1, best min at step 2


def _run(**manager_kwargs: Any) -> str:
    """A finished run with one checkpoint per score (steps 0..4), model_factory=Net."""
    torch.manual_seed(0)
    model = Net()
    options: dict[str, Any] = {"model_factory": Net, "async_save": False, **manager_kwargs}
    with (
        mlflow.start_run(run_name="train") as run,
        mlflow_ckpt.CheckpointManager({"model": model}, **options) as manager,
    ):
        for step, score in enumerate(SCORES):
            with torch.no_grad():
                model.state_dict()["body.0.bias"][0] = score
            manager.save(step, metrics={"loss": 1.0 / (step + 1)})
    return run.info.run_id


def _bias(model: torch.nn.Module) -> float:
    return float(model.state_dict()["body.0.bias"][0])


def score(model: torch.nn.Module) -> dict[str, float]:
    assert not model.training  # rebuilt in eval mode
    assert not torch.is_grad_enabled()  # called under torch.no_grad()
    return {"x": _bias(model)}


def inverted(model: torch.nn.Module) -> dict[str, float]:
    return {"x": 1.0 - _bias(model)}


def _by_step(run_id: str) -> dict[int, mlflow_ckpt.Checkpoint]:
    return {c.step: c for c in mlflow_ckpt.list_checkpoints(run_id)}


def test_every_checkpoint_of_a_finished_run_is_scored_and_linked(tracking: str) -> None:
    run_id = _run()
    client = MlflowClient()
    assert client.get_run(run_id).info.status == "FINISHED"

    result = evaluate(run_id, score, metric_prefix="eval_")

    assert result.name == "eval_tests.test_evaluate.score"
    assert [c.checkpoint.step for c in result.evaluated if c.checkpoint] == [0, 1, 2, 3, 4]
    assert not result.skipped and not result.failed
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "eval_x"))
    assert history == [(s, pytest.approx(v)) for s, v in enumerate(SCORES)]
    for step, ckpt in _by_step(run_id).items():
        linked = client.get_logged_model(ckpt.model_id)
        linked_x = [(m.key, m.step) for m in linked.metrics or [] if m.key == "eval_x"]
        assert linked_x == [("eval_x", step)]
        assert ckpt.metrics["eval_x"] == pytest.approx(SCORES[step])
        assert ckpt.metrics["loss"] == pytest.approx(1.0 / (step + 1))  # the training's, kept
        assert linked.tags[EVALUATED + result.name] == '["eval_x"]'
    best = mlflow_ckpt.best_checkpoint(run_id=run_id, metric="eval_x", mode="max")
    worst = mlflow_ckpt.best_checkpoint(run_id=run_id, metric="eval_x", mode="min")
    assert best is not None and best.step == 1
    assert worst is not None and worst.step == 2


def test_a_failing_checkpoint_is_reported_and_the_others_go_on(
    tracking: str, caplog: pytest.LogCaptureFixture
) -> None:
    run_id = _run()
    failing = _by_step(run_id)[3]

    def flaky(model: torch.nn.Module) -> dict[str, float]:
        if abs(_bias(model) - SCORES[3]) < 1e-6:
            raise RuntimeError("benchmark server down")
        return score(model)

    with (
        caplog.at_level(logging.WARNING, logger="mlflow_ckpt.after_training.evaluation"),
        pytest.raises(EvaluationError) as raised,
    ):
        evaluate(run_id, flaky, name="bench")
    error = raised.value
    assert list(error.failures) == [failing.uri]
    assert isinstance(error.failures[failing.uri], RuntimeError)
    assert isinstance(error.__cause__, RuntimeError)
    message = str(error)
    assert failing.uri in message and f"run {run_id}, step 3" in message
    assert "benchmark server down" in message and "1 of 5" in message
    assert failing.uri in caplog.text and "benchmark server down" in caplog.text
    result = error.result
    assert isinstance(result, EvaluationResult)
    assert [c.checkpoint.step for c in result.evaluated if c.checkpoint] == [0, 1, 2, 4]
    ckpts = _by_step(run_id)
    assert "x" not in ckpts[3].metrics
    assert {s: c.metrics.get("x") for s, c in ckpts.items() if s != 3} == {
        s: pytest.approx(SCORES[s]) for s in (0, 1, 2, 4)
    }

    # the same evaluation again: only the failed checkpoint runs
    again = evaluate(run_id, score, name="bench")
    assert [c.checkpoint.step for c in again.evaluated if c.checkpoint] == [3]
    assert len(again.skipped) == 4
    assert _by_step(run_id)[3].metrics["x"] == pytest.approx(SCORES[3])

    # raise_on_failure=False: the failures are in the result (and a warning), not raised
    quiet = evaluate(run_id, flaky, metric_prefix="b2_", name="bench2", raise_on_failure=False)
    assert [c.uri for c in quiet.failed] == [failing.uri] and len(quiet.evaluated) == 4


def test_evaluated_checkpoints_are_skipped_and_overwrite_wins(tracking: str) -> None:
    run_id = _run()
    first = evaluate(run_id, score, name="bench")
    assert len(first.evaluated) == 5

    calls: list[int] = []

    def counted(model: torch.nn.Module) -> dict[str, float]:
        calls.append(1)
        return inverted(model)

    again = evaluate(run_id, counted, name="bench")
    assert calls == [] and len(again.skipped) == 5 and not again.evaluated
    assert [c.metrics["x"] for c in again.skipped] == [pytest.approx(v) for v in SCORES]
    best = mlflow_ckpt.best_checkpoint(run_id=run_id, metric="x", mode="max")
    assert best is not None and best.step == 1

    # overwrite at once (same millisecond or not): the new values win at each step
    redone = evaluate(run_id, counted, name="bench", overwrite=True)
    assert len(calls) == 5 and len(redone.evaluated) == 5
    best = mlflow_ckpt.best_checkpoint(run_id=run_id, metric="x", mode="max")
    assert best is not None and best.step == 2  # 1 - 0.1
    worst = mlflow_ckpt.best_checkpoint(run_id=run_id, metric="x", mode="min")
    assert worst is not None and worst.step == 1
    for step, ckpt in _by_step(run_id).items():
        assert ckpt.metrics["x"] == pytest.approx(1.0 - SCORES[step])
        linked = MlflowClient().get_logged_model(ckpt.model_id)
        assert len([m for m in linked.metrics or [] if m.key == "x"]) == 2  # both kept, newest wins


class DiesBeforeTheFinalTag(MlflowClient):
    """A real client whose process "dies" (raises) when evaluate marks a checkpoint done:
    after the metrics are logged, before the tag that says so."""

    def set_logged_model_tags(self, model_id: str, tags: dict[str, Any]) -> None:
        if any(k.startswith(EVALUATED) and v.startswith("[") for k, v in tags.items()):
            raise RuntimeError("killed")
        super().set_logged_model_tags(model_id, tags)


def test_a_crash_between_the_values_and_the_tag_evaluates_again(tracking: str) -> None:
    run_id = _run()
    crashed = evaluate(
        run_id, inverted, name="bench", client=DiesBeforeTheFinalTag(), raise_on_failure=False
    )
    assert len(crashed.failed) == 5
    tag = MlflowClient().get_logged_model(_by_step(run_id)[0].model_id).tags[EVALUATED + "bench"]
    assert tag == '{"pending": ["x"]}'  # the values may be there, the evaluation is not done

    again = evaluate(run_id, score, name="bench")  # not skipped, not refused as a clash
    assert len(again.evaluated) == 5
    best = mlflow_ckpt.best_checkpoint(run_id=run_id, metric="x", mode="max")
    assert best is not None and best.step == 1  # the values of the evaluation that finished
    assert all(c.metrics["x"] == pytest.approx(SCORES[s]) for s, c in _by_step(run_id).items())
    assert len(evaluate(run_id, score, name="bench").skipped) == 5


def test_given_checkpoints_and_uris_with_a_prefix(tracking: str) -> None:
    run_id = _run()
    ckpts = _by_step(run_id)
    given = [ckpts[4], ckpts[0].uri, ckpts[2].model_id, ckpts[4].uri]  # (a repeat)
    result = evaluate(given, score, metric_prefix="heldout/")
    assert result.name == "heldout/tests.test_evaluate.score"
    assert [c.uri for c in result.evaluated] == [ckpts[4].uri, ckpts[0].uri, ckpts[2].uri]
    assert all(set(c.metrics) == {"heldout/x"} for c in result.evaluated)
    after = _by_step(run_id)
    assert {s for s, c in after.items() if "heldout/x" in c.metrics} == {0, 2, 4}
    best = mlflow_ckpt.best_checkpoint(run_id=run_id, metric="heldout/x", mode="max")
    assert best is not None and best.step == 4  # of the evaluated ones
    one = evaluate(ckpts[1].uri, score, metric_prefix="heldout/")  # one URI alone
    assert [c.checkpoint.step for c in one.evaluated if c.checkpoint] == [1]

    bad = evaluate(["models:/m-" + "0" * 32, ckpts[3]], score, name="other", raise_on_failure=False)
    assert [c.status for c in bad.checkpoints] == ["failed", "evaluated"]
    assert bad.failed[0].checkpoint is None
    assert isinstance(bad.failed[0].error, mlflow_ckpt.CheckpointNotFoundError)


def test_compressed_checkpoints_and_a_checkpoint_without_factory(tracking: str) -> None:
    run_id = _run(compression="zstd")
    result = evaluate(run_id, score, name="zstd")
    assert [c.metrics["x"] for c in result.evaluated] == [pytest.approx(v) for v in SCORES]

    with (
        mlflow.start_run(run_name="no factory") as run,
        mlflow_ckpt.CheckpointManager({"model": Net()}, async_save=False) as manager,
    ):
        manager.save(0)
    with pytest.raises(EvaluationError, match="model_factory=") as raised:
        evaluate(run.info.run_id, score, name="bench")
    (uri,) = raised.value.failures
    assert uri == mlflow_ckpt.list_checkpoints(run.info.run_id)[0].uri
    assert f"run {run.info.run_id}" in str(raised.value)


def test_bad_answers_and_names_are_refused_clearly(tracking: str) -> None:
    run_id = _run()
    with pytest.raises(ValueError, match="needs name="):
        evaluate(run_id, lambda m: {"x": 1.0})
    with pytest.raises(ValueError, match="needs name="):
        evaluate(run_id, functools.partial(score))
    with pytest.raises(ValueError, match="evaluation name"):
        evaluate(run_id, score, name="a b")
    assert evaluation_name(score, "eval/") == "eval/tests.test_evaluate.score"

    with pytest.raises(EvaluationError, match="must return a mapping") as raised:
        evaluate(run_id, lambda m: 0.5, name="scalar")  # type: ignore[arg-type,return-value]
    assert len(raised.value.failures) == 5
    with pytest.raises(EvaluationError, match=r"'v' .* not a number"):
        evaluate(run_id, lambda m: {"v": torch.ones(3)}, name="tensor")  # type: ignore[dict-item]
    with pytest.raises(EvaluationError, match="metric_prefix=") as raised:
        evaluate(run_id, lambda m: {"loss": 0.0, "new": 1.0}, name="clash")  # the training's
    assert "would log loss at step 0 of checkpoint" in str(raised.value)
    assert all(c.metrics["loss"] == pytest.approx(1 / (s + 1)) for s, c in _by_step(run_id).items())
    assert not any("new" in c.metrics for c in mlflow_ckpt.list_checkpoints(run_id))
    nan = evaluate(run_id, lambda m: {"nan": float("nan")}, name="nan")  # to the run only
    assert len(nan.evaluated) == 5
    assert mlflow_ckpt.best_checkpoint(run_id=run_id, metric="nan") is None
    assert len(MlflowClient().get_metric_history(run_id, "nan")) == 5


def test_progress_bar_only_on_a_terminal_unless_forced(
    tracking: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run_id = _run()
    capsys.readouterr()
    evaluate(run_id, score, metric_prefix="q_", name="quiet")
    assert capsys.readouterr().err == ""  # stderr is not a terminal under pytest
    evaluate(run_id, score, metric_prefix="s_", name="shown", progress=True)
    err = capsys.readouterr().err
    assert "evaluate shown" in err and "0/5" in err  # (tqdm redraws at most 10 times a second)
    evaluate(run_id, score, metric_prefix="o_", name="off", progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_evaluate_after_example(tmp_path: Path) -> None:
    out = run_example("evaluate_after.py", tmp_path)
    number = r"\s+([\d.]+)"
    rows = re.findall(rf"^\s*(\d+){number * 3}\s+models:/m-\w+$", out, re.M)
    assert [int(r[0]) for r in rows] == [19, 39, 59, 79, 99], out
    best = re.search(r"best by heldout/accuracy: step (\d+) \(([\d.]+)\)", out)
    assert best, out
    top = max(rows, key=lambda r: (float(r[3]), int(r[0])))  # ties: the newer step
    assert best.group(1) == top[0], out
    assert "first call: 5 evaluated, 0 skipped" in out
    assert "second call: 0 evaluated, 5 skipped" in out
    assert re.search(r"^trained run \w+ \(now FINISHED\)$", out, re.M), out
    assert "workflowType=machine_learning" in out
    assert (tmp_path / "mlflow.db").exists()


def broken(model: torch.nn.Module) -> dict[str, float]:
    raise RuntimeError("no benchmark data")


def test_the_cli_scores_a_run_and_exits_1_naming_failures(tracking: str) -> None:
    from click.testing import CliRunner

    from mlflow_ckpt.cli import evaluation  # noqa: F401 - registers the command
    from mlflow_ckpt.cli.group import main

    run_id = _run()
    runner = CliRunner()
    fn = "tests.test_evaluate:score"
    done = runner.invoke(main, ["evaluate", run_id, "--fn", fn, "--prefix", "cli_"])
    assert done.exit_code == 0, done.output
    assert (
        len(re.findall(r"^\d+\s+evaluated\s+cli_x=[\d.]+\s+models:/m-\w+$", done.output, re.M)) == 5
    )
    best = mlflow_ckpt.best_checkpoint(run_id=run_id, metric="cli_x", mode="max")
    assert best is not None and best.step == 1
    again = runner.invoke(main, ["evaluate", run_id, "--fn", fn, "--prefix", "cli_", "--json"])
    assert again.exit_code == 0, again.output
    assert {r["status"] for r in json.loads(again.output)} == {"skipped"}

    uri = _by_step(run_id)[2].uri
    failed = runner.invoke(main, ["evaluate", uri, "--fn", "tests.test_evaluate:broken"])
    assert failed.exit_code == 1
    assert f"FAILED {uri}: no benchmark data" in failed.output
    bad = runner.invoke(main, ["evaluate", run_id, "--fn", "tests.test_evaluate:nothing"])
    assert bad.exit_code == 1 and "Cannot import the evaluation function" in bad.output


def test_a_checkpoint_written_under_a_process_group_is_evaluated_in_a_plain_one(
    tracking: str, tmp_path: Path
) -> None:
    """Saved by the distributed write path (a gloo world of one here: the same sharded
    layout, DCP shards and root manifest as more ranks), scored after the group is gone."""
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "rendezvous"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        run_id = _run()
    finally:
        dist.destroy_process_group()
    folder = local_path_of(_by_step(run_id)[0].artifact_location)
    assert folder is not None
    assert json.loads((folder / "manifest.json").read_text())["world_size"] == 1
    assert (folder / "shards" / "metadata.json").is_file()  # DCP shards, JSON metadata
    result = evaluate(run_id, score, name="after-dist")
    assert [c.metrics["x"] for c in result.evaluated] == [pytest.approx(v) for v in SCORES]

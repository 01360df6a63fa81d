"""``mlflow_ckpt.average``: the weighted mean of checkpoints, logged as a checkpoint of its own
that serves and promotes like any other but is never listed, resumed from or deleted by the
run's retention. Real sqlite store and local artifacts; distributed sources from torchrun."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

import mlflow_ckpt
import mlflow_ckpt.cli.averaging  # registers `mlflow-ckpt average`
import mlflow_ckpt.flavor
from mlflow_ckpt.after_training.averaging import average
from mlflow_ckpt.catalog import resolve
from mlflow_ckpt.cli import main as cli
from mlflow_ckpt.errors import CheckpointNotFoundError, StateMismatchError
from tests.conftest import ROOT
from tests.distlib import reports, torchrun
from tests.test_examples import run_example


class BNNet(torch.nn.Module):
    """Linear -> BatchNorm -> Linear, plus a bfloat16 and a float64 buffer (dtype rules)."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(4, hidden), torch.nn.BatchNorm1d(hidden), torch.nn.Linear(hidden, 2)
        )
        self.register_buffer("low", torch.zeros(5, dtype=torch.bfloat16))
        self.register_buffer("wide", torch.zeros(3, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _train(steps: Sequence[int], *, hidden: int = 8, seed: int = 0, **options: object) -> str:
    """A run with a checkpoint at each of ``steps``; the weights move between them (and
    BatchNorm counts its batches). Returns the run ID."""
    torch.manual_seed(seed)
    model = BNNet(hidden)
    with mlflow.start_run() as run:
        with mlflow_ckpt.CheckpointManager(
            {"model": model},
            async_save=False,
            model_factory=BNNet,
            model_kwargs={"hidden": hidden},
            **options,  # type: ignore[arg-type]
        ) as mgr:
            for step in steps:
                model.train()
                model(torch.randn(6, 4))  # BatchNorm: running stats, num_batches_tracked
                with torch.no_grad():
                    for tensor in [*model.parameters(), model.low, model.wide]:
                        tensor.add_(torch.randn(tensor.shape).to(tensor.dtype))
                mgr.save(step, metrics={"val_loss": 1.0 / (step + 1)})
    return run.info.run_id


def _model_state(uri: str) -> dict[str, torch.Tensor]:
    return dict(mlflow_ckpt.load_training_state(uri)["model"])


def _by_hand(uris: Sequence[str], weights: Sequence[float], newest: str) -> dict[str, torch.Tensor]:
    """The expected average: float sums in float32 (float64 kept), cast back; the rest from
    ``newest``."""
    states = [_model_state(u) for u in uris]
    total = sum(weights)
    out = {}
    for key, value in _model_state(newest).items():
        if not value.is_floating_point():
            out[key] = value
            continue
        acc = torch.float64 if value.dtype == torch.float64 else torch.float32
        mean = sum(s[key].to(acc) * (w / total) for s, w in zip(states, weights, strict=True))
        assert isinstance(mean, torch.Tensor)
        out[key] = mean.to(value.dtype)
    return out


def _assert_state(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype, key
        torch.testing.assert_close(got[key], value, msg=key)


def _logged_models(experiment_id: str) -> list[str]:
    return [m.model_id for m in MlflowClient().search_logged_models([experiment_id])]


def test_average_is_the_weighted_mean_with_dtypes_and_integer_buffers(tracking: str) -> None:
    run_id = _train([0, 1, 2])
    ckpts = mlflow_ckpt.list_checkpoints(run_id)  # newest first
    newest = ckpts[0]
    oldest_first = list(reversed(ckpts))  # the newest is found by step, not by position
    avg = average(oldest_first)
    assert (avg.step, avg.run_id, avg.triggers) == (2, run_id, ("average",))
    got = _model_state(avg.uri)
    expected = _by_hand([c.uri for c in oldest_first], [1, 1, 1], newest.uri)
    _assert_state(got, expected)
    assert {str(v.dtype) for v in got.values()} >= {"torch.bfloat16", "torch.float64"}
    batches = got["body.1.num_batches_tracked"]
    assert batches.dtype == torch.int64 and int(batches) == 3  # the newest's, not a mean
    # weighted, from URIs and records mixed; weights are normalised
    uris: list[mlflow_ckpt.Checkpoint | str] = [ckpts[2].uri, ckpts[1], ckpts[0].uri]
    weighted = average(uris, weights=[1, 2, 5])
    _assert_state(
        _model_state(weighted.uri), _by_hand([c.uri for c in oldest_first], [1, 2, 5], newest.uri)
    )
    model = MlflowClient().get_logged_model(weighted.model_id)
    sources = json.loads(model.tags["mlflow_ckpt.averaged_from"])
    in_order = [ckpts[2], ckpts[1], ckpts[0]]
    assert [(s["model_id"], s["step"]) for s in sources] == [(c.model_id, c.step) for c in in_order]
    assert [s["weight"] for s in sources] == pytest.approx([1 / 8, 2 / 8, 5 / 8])
    assert model.name == "average-step-2" and model.params["averaged_steps"] == "0,1,2"
    # a weight of zero leaves a source out; the integer buffer is still the newest's
    only_first = average([ckpts[2], ckpts[0]], weights=[1, 0])
    low = _model_state(only_first.uri)
    torch.testing.assert_close(low["body.0.weight"], _model_state(ckpts[2].uri)["body.0.weight"])
    assert int(low["body.1.num_batches_tracked"]) == 3
    # the same network, restored from the average
    net = BNNet()
    assert mlflow_ckpt.load(avg.uri, {"model": net}).model_id == avg.model_id
    torch.testing.assert_close(net.state_dict()["body.2.bias"], expected["body.2.bias"])


def test_mismatched_checkpoints_are_refused_before_anything_is_written(tracking: str) -> None:
    small = mlflow_ckpt.list_checkpoints(_train([0, 1], hidden=8))
    wide = mlflow_ckpt.latest_checkpoint(_train([0], hidden=9, seed=1))
    assert wide is not None
    experiment_id = MlflowClient().get_run(wide.run_id).info.experiment_id
    before = _logged_models(experiment_id)
    with pytest.raises(StateMismatchError) as caught:
        average([small[0], wide])
    message = str(caught.value)
    assert small[0].uri in message and wide.uri in message
    assert "'body.0.weight' is float32[8, 4]" in message and "float32[9, 4]" in message
    assert "Nothing was written" in message and "one architecture" in message
    assert "body.0.weight" in caught.value.mismatched
    # a key only in one: a plain state dict saved without the BatchNorm layer
    with mlflow.start_run():
        other = mlflow_ckpt.flavor.log_model(
            {"model": {k: v for k, v in BNNet().state_dict().items() if ".1." not in k}}
        )
    with pytest.raises(StateMismatchError, match="only in") as caught:
        average([small[0], other])
    assert "body.1.running_mean" in caught.value.missing
    with pytest.raises(mlflow_ckpt.CheckpointError, match="at least 2"):
        average([small[0]])
    with pytest.raises(ValueError, match="one each"):
        average(small, weights=[1.0])
    with pytest.raises(ValueError, match="non-negative"):
        average(small, weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="all be zero"):
        average(small, weights=[0, 0])
    assert set(_logged_models(experiment_id)) == {*before, other.model_id}


class TiedNet(torch.nn.Module):
    """Two layers sharing one weight: stored once, a key each in the state dict."""

    def __init__(self) -> None:
        super().__init__()
        self.encode = torch.nn.Linear(3, 3)
        self.decode = torch.nn.Linear(3, 3)
        self.decode.weight = self.encode.weight


def test_tied_weights_and_damaged_sources(tracking: str) -> None:
    torch.manual_seed(0)
    model = TiedNet()
    with mlflow.start_run() as run:
        with mlflow_ckpt.CheckpointManager({"model": model}, async_save=False) as mgr:
            for step in range(3):
                with torch.no_grad():
                    model.encode.weight.add_(1.0)
                mgr.save(step)
    ckpts = mlflow_ckpt.list_checkpoints(run.info.run_id)
    avg = average(ckpts[:2])
    got = _model_state(avg.uri)
    assert set(got) == {"encode.weight", "encode.bias", "decode.weight", "decode.bias"}
    _assert_state(got, _by_hand([c.uri for c in ckpts[:2]], [1, 1], ckpts[0].uri))
    torch.testing.assert_close(got["decode.weight"], got["encode.weight"])
    # a flipped byte in a source: its hash fails, the file is named, nothing is written
    experiment_id = run.info.experiment_id
    before = _logged_models(experiment_id)
    shard = next(Path(ckpts[2].artifact_location).glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(mlflow_ckpt.CheckpointCorruptedError, match=shard.name):
        average([ckpts[0], ckpts[2]])
    assert _logged_models(experiment_id) == before


def test_average_is_no_training_checkpoint_but_promotes_and_can_be_best(tracking: str) -> None:
    run_id = _train([0, 1, 2, 3])
    ckpts = mlflow_ckpt.list_checkpoints(run_id)
    avg = average(ckpts[:3])
    assert mlflow_ckpt.list_checkpoints(run_id) == ckpts  # not listed
    latest = mlflow_ckpt.latest_checkpoint(run_id)
    assert latest is not None and latest.model_id == ckpts[0].model_id
    # resume does not resume from it; retention (keep_last_n=1 at close) does not delete it
    net = BNNet()
    with mlflow_ckpt.CheckpointManager.resume(
        run_id, {"model": net}, async_save=False, keep_last_n=1, save_last=False
    ) as manager:
        assert manager.resumed_from is not None
        assert manager.resumed_from.model_id == ckpts[0].model_id
    mlflow.end_run()
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run_id)] == [3]
    status = MlflowClient().get_logged_model(avg.model_id).tags["mlflow_ckpt.status"]
    assert status == "committed"
    result = CliRunner().invoke(cli, ["gc", run_id, "--keep-last", "1"])
    assert result.exit_code == 0, result.output
    assert resolve(avg.uri, MlflowClient()).model_id == avg.model_id  # gc left it too
    # --last N never picks an average (the run's 1 checkpoint is all there is)
    result = CliRunner().invoke(cli, ["average", run_id, "--last", "2"])
    assert result.exit_code == 1 and "has 1 committed checkpoint(s)" in result.output
    # an evaluated average can be the experiment's best, and promotes like any checkpoint
    MlflowClient().log_metric(run_id, "val_loss", 0.01, step=avg.step, model_id=avg.model_id)
    experiment_id = MlflowClient().get_run(run_id).info.experiment_id
    best = mlflow_ckpt.best_checkpoint(experiment_ids=[experiment_id], metric="val_loss")
    assert best is not None and best.model_id == avg.model_id
    version = mlflow_ckpt.promote(best, registered_model_name="averaged", alias="champion")
    assert version.version == "1" or int(version.version) == 1
    served = mlflow.pyfunc.load_model("models:/averaged@champion")
    batch = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    rebuilt = mlflow_ckpt.load_model(avg.uri)
    with torch.no_grad():
        expected = rebuilt(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(served.predict(batch), expected, rtol=1e-6)


NET_CODE = """
import torch


class TinyNet(torch.nn.Module):
    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, width)

    def forward(self, x):
        return self.lin(x)
"""


@pytest.mark.slow
def test_average_serves_through_pyfunc_and_mlflow_models_predict(
    tracking: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The network's code travels with the average (the newest source's ``code/``), so the
    CLI serves it from a folder where that code is not importable."""
    code = tmp_path / "src"
    code.mkdir()
    (code / "avgnet_pkg.py").write_text(NET_CODE)
    monkeypatch.syspath_prepend(str(code))
    import avgnet_pkg  # type: ignore[import-not-found]

    torch.manual_seed(0)
    model = avgnet_pkg.TinyNet(3)
    with mlflow.start_run() as run:
        with mlflow_ckpt.CheckpointManager(
            {"model": model},
            async_save=False,
            model_factory=avgnet_pkg.TinyNet,
            model_kwargs={"width": 3},
            code_paths=[code / "avgnet_pkg.py"],
        ) as mgr:
            for step in range(3):
                with torch.no_grad():
                    model.lin.weight.add_(1.0)
                mgr.save(step)
    avg = average(mlflow_ckpt.list_checkpoints(run.info.run_id))
    batch = np.array([[1.0, 2.0], [0.5, -1.0]], dtype=np.float32)
    net = avgnet_pkg.TinyNet(3)
    mlflow_ckpt.load(avg.uri, {"model": net})
    with torch.no_grad():
        expected = net(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(mlflow.pyfunc.load_model(avg.uri).predict(batch), expected)
    assert isinstance(mlflow_ckpt.load_model(avg.uri), torch.nn.Module)

    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "input.json").write_text(json.dumps({"inputs": batch.tolist()}))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(ROOT)  # mlflow_ckpt itself, not the network's code
    predict = ["predict", "-m", avg.uri, "-i", "input.json", "-t", "json"]
    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "models", *predict, "--env-manager", "local"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    predictions = json.loads(proc.stdout.strip().splitlines()[-1])["predictions"]
    np.testing.assert_allclose(np.array(predictions), expected, rtol=1e-6)


@pytest.mark.slow
def test_average_of_two_rank_fsdp2_checkpoints_in_one_plain_process(
    tracking: str, tmp_path: Path
) -> None:
    out = tmp_path / "job"
    torchrun(2, out, "--strategy", "fsdp2", "--steps", "4", "--save-every", "2")
    run_id = reports(out)[0]["run_id"]
    ckpts = mlflow_ckpt.list_checkpoints(run_id)
    assert [c.step for c in ckpts] == [3, 1]
    avg = average(ckpts, weights=[3, 1])
    assert avg.step == 3 and avg.run_id == run_id
    expected = _by_hand([c.uri for c in ckpts], [3, 1], ckpts[0].uri)
    got = _model_state(avg.uri)
    assert list(got) == ["0.weight", "0.bias", "3.weight", "3.bias"]  # the full tensors
    _assert_state(got, expected)
    batch = torch.randn(3, 7)
    from tests.dist_job import build_model

    net = build_model()
    net.load_state_dict(got)
    with torch.no_grad():
        want = net.eval()(batch).numpy()
    np.testing.assert_allclose(mlflow.pyfunc.load_model(avg.uri).predict(batch.numpy()), want)
    # a distributed source and a single-process one of the same network average too
    with mlflow.start_run():
        single = mlflow_ckpt.flavor.log_model(build_model(), step=7)
    mixed = average([ckpts[0], single])
    assert mixed.step == 7 and list(_model_state(mixed.uri)) == list(got)


KILLED_CHILD = """
import sys, time
import mlflow_ckpt.folder.writer as writer
from mlflow_ckpt.after_training.averaging import average

def stall(store, manifest):  # every tensor file is written; the manifest never comes
    print("WRITING", flush=True)
    time.sleep(600)

writer.write_manifest = stall
average(sys.argv[1:])
"""


@pytest.mark.slow
def test_a_kill_during_average_leaves_nothing_visible_and_gc_removes_it(
    tracking: str, tmp_path: Path
) -> None:
    run_id = _train([0, 1, 2])
    ckpts = mlflow_ckpt.list_checkpoints(run_id)
    experiment_id = MlflowClient().get_run(run_id).info.experiment_id
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(KILLED_CHILD))
    env = dict(os.environ, PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=mlflow.get_tracking_uri())
    child = subprocess.Popen(
        [sys.executable, str(script), *(c.uri for c in ckpts)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.strip() == "WRITING", line + (child.stderr.read() if child.stderr else "")
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=60)
    found = MlflowClient().search_logged_models(
        [experiment_id], filter_string="name LIKE 'average-step-%'"
    )
    assert len(found) == 1 and found[0].tags["mlflow_ckpt.status"] == "pending"
    assert list(Path(found[0].artifact_location).glob("*.safetensors"))  # half made
    with pytest.raises(CheckpointNotFoundError, match="never finished"):
        resolve(found[0].model_id, MlflowClient())
    assert mlflow_ckpt.list_checkpoints(run_id) == ckpts
    best = mlflow_ckpt.best_checkpoint(experiment_ids=[experiment_id], metric="val_loss")
    assert best is not None and best.model_id == ckpts[0].model_id
    # the run's recovery (gc, or the next resume) discards it: files, then the LoggedModel
    result = CliRunner().invoke(cli, ["gc", run_id])
    assert result.exit_code == 0, result.output
    assert (
        MlflowClient().search_logged_models(
            [experiment_id], filter_string="name LIKE 'average-step-%'"
        )
        == []
    )
    assert not Path(found[0].artifact_location).exists() or not any(
        Path(found[0].artifact_location).iterdir()
    )
    assert mlflow_ckpt.list_checkpoints(run_id) == ckpts


def test_cli_averages_the_last_n_of_a_run_or_the_uris_given(tracking: str) -> None:
    run_id = _train([0, 1, 2])
    ckpts = mlflow_ckpt.list_checkpoints(run_id)
    runner = CliRunner()
    result = runner.invoke(cli, ["average", run_id, "--last", "2", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["step"] == 2 and data["triggers"] == ["average"] and data["run_id"] == run_id
    _assert_state(
        _model_state(data["uri"]), _by_hand([c.uri for c in ckpts[:2]], [1, 1], ckpts[0].uri)
    )
    uris = [c.uri for c in ckpts]
    result = runner.invoke(cli, ["average", *uris, "--weights", "1,1,2"])
    assert result.exit_code == 0, result.output
    assert "average" in result.output and "models:/m-" in result.output
    uri = re.findall(r"models:/m-\w+", result.output)[0]
    _assert_state(_model_state(uri), _by_hand(uris, [1, 1, 2], ckpts[0].uri))
    # into another run
    with mlflow.start_run() as other:
        pass
    result = runner.invoke(cli, ["average", *uris[:2], "--run-id", other.info.run_id, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["run_id"] == other.info.run_id
    # usage errors: one URI, --last with URIs, weights that do not fit, a mismatch
    assert runner.invoke(cli, ["average", uris[0]]).exit_code == 2
    assert runner.invoke(cli, ["average", *uris[:2], "--last", "2"]).exit_code == 2
    bad = runner.invoke(cli, ["average", *uris[:2], "--weights", "1,x"])
    assert bad.exit_code == 2 and "--weights" in bad.output
    assert runner.invoke(cli, ["average", *uris[:2], "--weights", "1,2,3"]).exit_code == 2
    wide = mlflow_ckpt.latest_checkpoint(_train([0], hidden=9))
    assert wide is not None
    mismatch = runner.invoke(cli, ["average", uris[0], wide.uri])
    assert mismatch.exit_code == 1 and "Cannot average" in mismatch.output


@pytest.mark.slow
def test_example_averages_the_last_three_and_compares(tmp_path: Path) -> None:
    out = run_example("average_last.py", tmp_path)
    listed = re.search(r"^averaged steps ([\d, ]+) into (models:/m-\w+) \(step (\d+)\)$", out, re.M)
    assert listed, out
    assert [int(s) for s in listed.group(1).split(",")] == [299, 274, 249]
    scores = dict(re.findall(r"^(last checkpoint|average)\s+held-out loss ([\d.]+)", out, re.M))
    assert set(scores) == {"last checkpoint", "average"}, out
    assert float(scores["average"]) < float(scores["last checkpoint"])  # (seeded: 0.19 < 0.23)
    assert "(the resume points) is unchanged: steps [299, 274, 249, 224, 199]" in out
    assert (tmp_path / "mlflow.db").exists()  # MLflow's default store, in the working folder
    assert "workflowType=machine_learning" in out

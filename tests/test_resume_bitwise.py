"""Bit-for-bit resume: 2N steps straight == N steps, death, resume by run ID, N more."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

import mlflow_ckpt
from tests.conftest import RESUME_STEPS as STEPS
from tests.conftest import ROOT


def _assert_same(a: Path, b: Path) -> None:
    x = torch.load(a, weights_only=True)
    y = torch.load(b, weights_only=True)
    for key, tensor in x["model"].items():
        assert torch.equal(tensor, y["model"][key]), key
    assert x["optimizer"]["param_groups"] == y["optimizer"]["param_groups"]
    for index, entry in x["optimizer"]["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, y["optimizer"]["state"][index][key]), (index, key)
    assert x["lr"] == y["lr"]
    # the global random streams continue identically too
    assert x["python"] == y["python"]
    assert x["numpy"] == y["numpy"]
    assert torch.equal(x["torch"], y["torch"])


def die_then_resume(run_child, tmp_path: Path, *extra: str) -> tuple[str, Path, str]:
    """Train half the steps and die right after a commit; resume by run ID in a new process.

    Returns the run ID, the resumed run's final state file and the resume's stdout.
    """
    run_file, resumed = tmp_path / "run", tmp_path / "b.pt"
    first = run_child(
        "tests.train_script",
        "first",
        "--steps",
        str(STEPS),
        "--out",
        str(tmp_path / "x"),
        "--run-file",
        str(run_file),
        "--stop-after",
        str(STEPS // 2 - 1),
        *extra,
    )
    assert not (tmp_path / "x").exists(), first.stdout  # it really died mid-run
    run_id = run_file.read_text()
    assert mlflow_ckpt.latest_checkpoint(run_id).step == STEPS // 2 - 1
    out = run_child(
        "tests.train_script",
        "resume",
        "--steps",
        str(STEPS),
        "--out",
        str(resumed),
        "--run-file",
        str(run_file),
        *extra,
    )
    return run_id, resumed, out.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fmt", "sync"), [("safetensors", False), ("torch", False), ("safetensors", True)]
)
def test_resume_is_bitwise_identical(
    tmp_path: Path, run_child, straight_state: Path, fmt: str, sync: bool
) -> None:
    extra = ["--format", fmt] + (["--sync"] if sync else [])
    run_id, resumed, stdout = die_then_resume(run_child, tmp_path, *extra)
    assert f"resumed at {STEPS // 2}" in stdout
    _assert_same(straight_state, resumed)

    client = mlflow.MlflowClient()
    for key in ("train_loss", "val_loss"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == list(range(STEPS)), key  # each step exactly once
    run = client.get_run(run_id)
    assert run.data.tags["mlflow_ckpt.resumes"] == "1"
    assert run.info.status == "FINISHED"
    steps = sorted(c.step for c in mlflow_ckpt.list_checkpoints(run_id))
    assert steps == list(range(4, STEPS, 5))


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume_is_bitwise(tmp_path: Path, tracking: str) -> None:
    """SIGKILL from outside, wherever the child is; the resume still matches bit-for-bit."""
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking, MLFLOW_EXPERIMENT_NAME="tests")
    env["PYTHONPATH"] = str(ROOT)
    straight, resumed, run_file = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "run"
    steps = "400"
    base = [sys.executable, "-m", "tests.train_script"]
    subprocess.run(
        [*base, "straight", "--steps", steps, "--out", str(straight)],
        env=env,
        check=True,
        timeout=300,
    )
    child = subprocess.Popen(
        [
            *base,
            "first",
            "--steps",
            steps,
            "--out",
            str(tmp_path / "x"),
            "--run-file",
            str(run_file),
            "--every",
            "3",
        ],
        env=env,
    )
    try:
        deadline = 120
        while deadline > 0:  # wait until a few checkpoints exist, then kill wherever it is
            if run_file.exists() and len(mlflow_ckpt.list_checkpoints(run_file.read_text())) >= 3:
                break
            deadline -= 1
            child.wait(timeout=1) if child.poll() is not None else __import__("time").sleep(1)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    subprocess.run(
        [
            *base,
            "resume",
            "--steps",
            steps,
            "--out",
            str(resumed),
            "--run-file",
            str(run_file),
            "--every",
            "3",
        ],
        env=env,
        check=True,
        timeout=300,
    )
    _assert_same(straight, resumed)
    client = mlflow.MlflowClient()
    history = sorted(m.step for m in client.get_metric_history(run_file.read_text(), "train_loss"))
    assert history == list(range(int(steps)))

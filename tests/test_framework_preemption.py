"""Lightning and the Hugging Face Trainer under ``autolog(resume="auto")``: the identical
command, SIGKILLed mid-epoch and run again, ends bit for bit where an uninterrupted run
does, in one MLflow run, with a train loader shuffled by its own seeded generator.

``tests/framework_job.py`` is the job; the kill lands at the second batch of epoch 2, after
the checkpoint of epoch 1 (saves are synchronous), so the restart resumes from it. Without
the loaders' generators in the checkpoint the resumed epochs replay epoch 0's order (checked
by hand: both frameworks then end with other weights).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

import mlflow_ckpt
from mlflow_ckpt.catalog import tags
from tests.conftest import ROOT

pytestmark = pytest.mark.slow
EPOCHS = 4
STEPS_PER_EPOCH = 6


def _job(framework: str, key: str, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow.get_tracking_uri())
    env.update(MLFLOW_EXPERIMENT_NAME="tests", MLFLOW_CKPT_RUN_KEY=key)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    argv = [sys.executable, "-m", "tests.framework_job", framework, "--epochs", str(EPOCHS)]
    return subprocess.run(
        [*argv, "--out", str(out), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=out.parent,
    )


@pytest.mark.parametrize(
    ("framework", "workers"),
    [("lightning", "0"), ("hf", "0"), ("hf", "2")],
    ids=["lightning", "hf", "hf-2-workers"],
)
def test_the_same_command_after_kill9_ends_bit_for_bit(
    tracking: str, tmp_path: Path, framework: str, workers: str
) -> None:
    straight = _job(framework, "straight", tmp_path / "straight.st", "--workers", workers)
    assert straight.returncode == 0, straight.stderr[-3000:]

    out = tmp_path / "job.st"
    first = _job(framework, "job", out, "--kill-at", "2", "--workers", workers)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    assert not out.exists()
    (run,) = mlflow.search_runs(
        filter_string=f"tags.`{tags.RUN_KEY}` = 'job'", output_format="list"
    )
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run.info.run_id)] == [11, 5]

    second = _job(framework, "job", out, "--kill-at", "2", "--workers", workers)
    assert second.returncode == 0, second.stderr[-3000:]
    want, got = load_file(tmp_path / "straight.st"), load_file(out)
    assert want.keys() == got.keys()
    for key, value in want.items():
        assert torch.equal(value, got[key]), key
    (again,) = mlflow.search_runs(
        filter_string=f"tags.`{tags.RUN_KEY}` = 'job'", output_format="list"
    )
    assert again.info.run_id == run.info.run_id  # one run: the restart continued it
    steps = [c.step for c in mlflow_ckpt.list_checkpoints(run.info.run_id)]
    assert steps == [STEPS_PER_EPOCH * (e + 1) - 1 for e in reversed(range(EPOCHS))]
    assert MlflowClient().get_run(run.info.run_id).data.tags[tags.RUN_RESUMES] == "1"


@pytest.mark.parametrize("framework", ["lightning", "hf"])
def test_sigterm_mid_epoch_saves_that_step_and_the_same_command_continues_from_it(
    tracking: str, tmp_path: Path, framework: str
) -> None:
    """The signal lands inside the framework's loop, beside its own handling: the step is
    committed first, then the signal goes where it would have gone. Lightning installs a
    SIGTERM handler of its own, called after the save, and stops at the next batch with
    its SIGTERMException (a SystemExit: exit status 0); the Trainer has none, so SIGTERM's
    default action ends the process. Either way training stopped there, and the restart
    continues from that step."""
    out = tmp_path / "job.st"
    first = _job(framework, "term", out, "--sigterm-at", "2")
    expected = {"lightning": 0, "hf": -signal.SIGTERM}[framework]
    assert first.returncode == expected, first.stderr[-3000:]
    assert "SIGTERM: saved step" in first.stderr
    assert not out.exists()  # the training did not run on to its end
    (run,) = mlflow.search_runs(
        filter_string=f"tags.`{tags.RUN_KEY}` = 'term'", output_format="list"
    )
    saved = mlflow_ckpt.latest_checkpoint(run.info.run_id)
    assert tags.PREEMPTED in saved.triggers
    assert saved.step in (2 * STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH + 1)  # where it came
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run.info.run_id)][1:] == [11, 5]

    second = _job(framework, "term", out, "--sigterm-at", "2")
    assert second.returncode == 0, second.stderr[-3000:]
    steps = [c.step for c in mlflow_ckpt.list_checkpoints(run.info.run_id)]
    assert steps[0] == EPOCHS * STEPS_PER_EPOCH - 1 and saved.step in steps
    resumed = load_file(out)  # the restart continued from the saved step, to the end
    assert resumed and MlflowClient().get_run(run.info.run_id).data.tags[tags.RUN_RESUMES] == "1"

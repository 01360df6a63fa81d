"""The examples run end to end (so the README's promises can't rot)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def run_example(name: str, cwd: Path) -> str:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)  # the examples use MLflow's default sqlite:///mlflow.db
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_quickstart_runs_outside_the_repo(tmp_path: Path) -> None:
    """The docs' Quickstart, copied into an empty folder, sees the package and nothing else.

    PYTHONPATH names a folder holding only a link to the package (it comes before the
    editable install), so an import from examples/ or tests/ would fail here as it would
    for a user; `.ci/wheel` runs the same file against the built wheel.
    """
    site, work = tmp_path / "site", tmp_path / "work"
    site.mkdir()
    work.mkdir()
    (site / "mlflow_ckpt").symlink_to(ROOT / "mlflow_ckpt")
    shutil.copy(ROOT / "examples" / "quickstart.py", work)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(site)
    proc = subprocess.run(
        [sys.executable, "quickstart.py"], cwd=work, env=env, capture_output=True, text=True
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert re.search(r"^trained steps 0-29 in run \w+$", out, re.M), out
    assert "resumed: training goes on from step 30" in out
    listed = re.findall(r"^  step (\d+)  val_loss ([\d.]+)  (\S+)  models:/m-\w+$", out, re.M)
    assert [(int(step), trig) for step, _, trig in listed] == [
        (59, "periodic,best"),
        (49, "periodic,best"),
    ], out
    # the best checkpoint, restored into a new model, gives the val_loss logged for it
    best = re.search(r"best: step 59, loaded into a new model: val_loss ([\d.]+)", out)
    assert best and best.group(1) == listed[0][1], out
    assert f"mlflow ui --backend-store-uri sqlite:///{work}/mlflow.db" in out
    assert re.search(r"/#/experiments/\d+/models\?workflowType=machine_learning$", out, re.M)
    assert (work / "mlflow.db").exists()


@pytest.mark.slow
def test_train_and_resume_demo(tmp_path: Path) -> None:
    out = run_example("train_and_resume.py", tmp_path)
    assert "killed with SIGKILL (exit status -9)" in out
    assert re.search(r"resumed from step \d+, continuing", out)  # the identical command
    (sigterm,) = [line for line in out.splitlines() if "SIGTERM: exit status" in line]
    assert "exit status -15, after saving step" in sigterm and "(trigger preempted)" in sigterm
    step = int(sigterm.split("after saving step ")[1].split()[0])
    assert f"resumed from step {step}, continuing" in out  # ...and again from that step
    row = [str(step), str(step // 50), "preempted"]  # in the table: step, epoch, trigger
    assert any(line.split()[:3] == row for line in out.splitlines())
    assert "4) run " in out and "finished with" in out
    assert "mlflow ui --backend-store-uri sqlite:///" in out
    assert "workflowType=machine_learning" in out
    assert out.count("Look at them in the MLflow UI") == 1
    assert (tmp_path / "mlflow.db").exists()
    # The printed export command works from a folder where the demo's model code is not
    # importable: the checkpoint carries it (code_paths=).
    (command,) = [line.split() for line in out.splitlines() if "mlflow-ckpt export" in line]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PYTHONPATH")}
    cli = Path(sys.executable).with_name("mlflow-ckpt")
    proc = subprocess.run(
        [str(cli), *command[1:]], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "best.onnx").stat().st_size > 0


@pytest.mark.slow
def test_promote_best_example(tmp_path: Path) -> None:
    out = run_example("promote_best.py", tmp_path)
    assert "promoted to demo-classifier version 1 (@champion)" in out
    assert "predicted classes for 4 new samples" in out


@pytest.mark.slow
def test_distributed_fsdp_example(tmp_path: Path) -> None:
    out = run_example("distributed_fsdp.py", tmp_path)
    assert "2 ranks, run " in out and "starting at step 0" in out
    assert "3 ranks, run " in out and "starting at step 20" in out  # resumed, resharded
    assert "checkpoints of run" in out and "steps [29, 24]" in out  # keep_last_n=2
    assert "plain process: full state dict of step 29: {'0.weight': [64, 20]" in out
    assert "plain process: pyfunc predicted (4, 3) for 4 samples" in out
    assert "workflowType=machine_learning" in out


@pytest.mark.slow
def test_preemptible_torchrun_example(tmp_path: Path) -> None:
    out = run_example("preemptible_torchrun.py", tmp_path)
    first = re.search(r"attempt 0: run (\w+), starting at step 0", out)
    assert first, out
    # torchrun restarted both ranks after rank 1 died; they went on from step 14's checkpoint
    assert f"attempt 1: run {first.group(1)}, starting at step 15" in out
    assert "attempt 1: trained to step 29; checkpoints [29, 24]" in out


@pytest.mark.slow
def test_fine_tune_frozen_example(tmp_path: Path) -> None:
    out = run_example("fine_tune_frozen.py", tmp_path)
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    table = {int(r[0]): (float(r[1]), float(r[2]), r[3]) for r in rows if len(r) == 4}
    assert {step: row[2] for step, row in table.items()} == {
        119: "hot",
        114: "hot",
        59: "archive",
    }, out
    size, stored, _ = table[114]
    assert stored < 0.12 * size, out  # the head and its optimizer state only
    assert table[119][1] == table[119][0], out  # a milestone: written whole
    assert 0.5 * size < table[59][1] < size, out  # ... and recompressed once archived
    assert "promoted to fine-tuned-demo version 1 (@champion), now self-contained" in out
    assert "restored step 114" in out

"""Running ``tests/dist_job.py`` under ``torchrun`` (gloo, CPU), for tests and benchmarks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlflow

ROOT = Path(__file__).resolve().parent.parent
JOB = ROOT / "tests" / "dist_job.py"


def torchrun(
    nproc: int,
    out: Path,
    *args: str,
    check: bool = True,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    torchrun_args: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """Run the job on ``nproc`` ranks against the current tracking URI (``torchrun_args``:
    torchrun's own, e.g. ``--max-restarts=2``)."""
    environment = dict(os.environ, MLFLOW_TRACKING_URI=mlflow.get_tracking_uri())
    environment.update(env or {})
    environment["PYTHONPATH"] = os.pathsep.join([str(ROOT), environment.get("PYTHONPATH", "")])
    environment["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={nproc}", *torchrun_args, str(JOB), "--out", str(out), *args]
    proc = subprocess.run(cmd, env=environment, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun {args} exited {proc.returncode}\n{proc.stderr[-12000:]}")
    return proc


def reports(out: Path) -> list[dict[str, Any]]:
    """What each rank of a finished job wrote, in rank order."""
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank-*.json"))]

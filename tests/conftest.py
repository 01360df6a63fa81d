"""Helpers for tests that run training in child processes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def run_child(tracking: str) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``python -m MODULE ARGS...`` against the test's tracking store; fail loudly."""

    def run(module: str, *args: str, check: bool = True, timeout: float = 300):
        env = dict(os.environ, MLFLOW_TRACKING_URI=tracking, MLFLOW_EXPERIMENT_NAME="tests")
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        proc = subprocess.run(
            [sys.executable, "-m", module, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{module} {args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    return run

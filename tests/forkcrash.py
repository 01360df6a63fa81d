"""kill -9 during a fork, shared by ``tests/test_fork.py`` and ``benchmarks/faults.py``.

A source run holds a long metric history and one checkpoint; ``mlflow-ckpt fork`` of that
checkpoint runs in a child process that is SIGKILLed (when its run first shows up, or at a
seeded random moment). The guarantee: the source is exactly as it was; a half-copied fork
is marked (``mlflow_ckpt.fork_status=copying``) and is never resumed from; the next fork of
the same checkpoint deletes it, after which every visible fork holds the source's history
up to the step, complete.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric

import mlflow_ckpt
from mlflow_ckpt.catalog import lineage, tags
from mlflow_ckpt.errors import CheckpointError
from tests.conftest import ROOT


@dataclass(frozen=True)
class Source:
    run_id: str
    experiment_id: str
    uri: str
    step: int  # the checkpoint's: the history up to it is what a fork copies

    def history(self, client: MlflowClient, run_id: str | None = None) -> list[tuple]:
        points = client.get_metric_history(run_id or self.run_id, "loss")
        return sorted((m.step, m.value, m.timestamp) for m in points)


def make_source(points: int) -> Source:
    """A run (in the current experiment) with ``points`` steps of "loss" history, logged
    1000 at a time, and one checkpoint at its last step but ten (a fork copies nearly all:
    the longest window to be killed in)."""
    client = MlflowClient()
    with mlflow.start_run(run_name="long-history") as run:
        run_id = run.info.run_id
        for start in range(0, points, 1000):
            batch = [
                Metric("loss", 1.0 / (1 + s), 1_700_000_000_000 + s, s)
                for s in range(start, min(points, start + 1000))
            ]
            client.log_batch(run_id, metrics=batch)
        model = torch.nn.Linear(4, 2)
        with mlflow_ckpt.CheckpointManager({"model": model}, async_save=False) as manager:
            manager.save(points - 11)
    ckpt = mlflow_ckpt.latest_checkpoint(run_id)
    assert ckpt is not None
    return Source(run_id, run.info.experiment_id, ckpt.uri, ckpt.step)


def start_fork(source: Source) -> subprocess.Popen[bytes]:
    """``mlflow-ckpt fork`` of the source's checkpoint in a child process."""
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow.get_tracking_uri())
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, "-m", "mlflow_ckpt.cli", "fork", source.uri],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def forks(client: MlflowClient, source: Source) -> list[mlflow.entities.Run]:
    """The visible (not deleted) forks of the source's checkpoint."""
    return client.search_runs(
        [source.experiment_id], filter_string=f"tags.`{tags.FORKED_FROM}` = '{source.uri}'"
    )


def kill_when_copying(source: Source, timeout: float = 120.0) -> bool:
    """Start a fork and SIGKILL it as soon as its run is visible; whether it was caught
    while still copying (it may have finished first on a fast machine)."""
    client = MlflowClient()
    proc = start_fork(source)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            found = forks(client, source)
            if found:
                proc.kill()
                proc.wait()
                return any(r.data.tags.get(tags.FORK_STATUS) == tags.COPYING for r in found)
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return False


def kill_after(source: Source, delay: float) -> None:
    """Start a fork and SIGKILL it after ``delay`` seconds (if it is still running)."""
    proc = start_fork(source)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def check(source: Source, before: list[tuple]) -> tuple[list[str], list[str]]:
    """After a killed fork: (what was lost or wrongly accepted, other problems).

    Then forks again, as a user would, and checks that this leaves only complete forks."""
    client = MlflowClient()
    lost: list[str] = []
    problems: list[str] = []
    if source.history(client) != before:
        lost.append("the source run's history changed")
    for run in forks(client, source):
        if run.data.tags.get(tags.FORK_STATUS) == tags.READY:
            lost += _complete(client, source, run.info.run_id, before)
            continue
        try:
            mlflow_ckpt.CheckpointManager.resume(run.info.run_id, {"model": torch.nn.Linear(4, 2)})
        except CheckpointError as exc:
            if "incomplete fork" not in str(exc):
                problems.append(f"resuming half-made fork {run.info.run_id}: unclear error {exc}")
        else:
            lost.append(f"half-made fork {run.info.run_id} was resumed from")
        finally:
            while mlflow.active_run() is not None:
                mlflow.end_run()
    saved, lineage.ABANDONED_AFTER_S = lineage.ABANDONED_AFTER_S, 0.0  # (the dead one's
    try:  # heartbeat is recent; the user's retry comes minutes later)
        lineage.create_fork(client, source.uri)
    finally:
        lineage.ABANDONED_AFTER_S = saved
    for run in forks(client, source):
        if run.data.tags.get(tags.FORK_STATUS) != tags.READY:
            problems.append(f"half-made fork {run.info.run_id} still visible after a new fork")
        else:
            lost += _complete(client, source, run.info.run_id, before)
    return lost, problems


def _complete(client: MlflowClient, source: Source, run_id: str, before: list[tuple]) -> list[str]:
    want = [p for p in before if p[0] <= source.step]
    if source.history(client, run_id) != want:
        return [f"fork {run_id} is tagged ready but its history is not the source's"]
    return []

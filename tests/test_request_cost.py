"""What one checkpoint costs the tracking server, counted in a real ``mlflow server``'s
access log: the number of requests per save must not grow with the run's checkpoints."""

from __future__ import annotations

import collections
import re
from pathlib import Path

import mlflow
import pytest
import torch

import mlflow_ckpt
from tests import servers

pytestmark = pytest.mark.slow
_REQUEST = re.compile(r'"(GET|POST|PATCH|DELETE|PUT) (/api/2\.0/mlflow/[^ ?"]*)')
_ID = re.compile(r"m-[0-9a-f]{32}")


def _log() -> Path:
    return servers.log_path("mlflow-proxy")


def _tracking_requests(start: int) -> collections.Counter[str]:
    """Tracking API requests (not artifact transfers) logged since byte ``start``."""
    with open(_log(), "rb") as f:
        f.seek(start)
        text = f.read().decode(errors="replace")
    return collections.Counter(
        f"{method} {_ID.sub('m-ID', path)}" for method, path in _REQUEST.findall(text)
    )


def _saves(manager: mlflow_ckpt.CheckpointManager, steps: range) -> collections.Counter[str]:
    start = _log().stat().st_size
    for step in steps:
        manager.step(step, metrics={"loss": 1.0 / (step + 1)})
    manager.wait()
    return _tracking_requests(start)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_requests_per_checkpoint_stay_flat(
    proxy_server: servers.Server, monkeypatch: pytest.MonkeyPatch, async_save: bool
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy_server.url)
    mlflow.set_tracking_uri(proxy_server.url)
    try:
        mlflow.set_experiment(f"request-cost-{async_save}")
        with mlflow.start_run():
            state = {"w": torch.zeros(16)}
            manager = mlflow_ckpt.CheckpointManager(
                state,
                save_every_n_steps=1,
                async_save=async_save,
                timeline=False,
                lease_ttl=3600,  # no heartbeat (a per-minute cost, not a per-save one) meanwhile
            )
            _saves(manager, range(0, 5))  # warm up
            early = _saves(manager, range(5, 15))
            _saves(manager, range(15, 60))
            late = _saves(manager, range(60, 70))
            manager.close()
        print(f"{'async' if async_save else 'sync'} requests per 10 saves: {dict(early)}")
        assert early == late, (early, late)  # the same requests, as many: flat
        per_save = sum(early.values()) / 10
        assert per_save <= 10, early
        assert "GET /api/2.0/mlflow/runs/get" not in early  # its cost grows with outputs
    finally:
        mlflow.set_tracking_uri(None)


def test_requests_per_checkpoint_with_retention_stay_flat(
    proxy_server: servers.Server, monkeypatch: pytest.MonkeyPatch
):
    """keep_every_n_steps milestones pile up, yet a save does not list the run's
    checkpoints again: the writer keeps track of what it committed and deleted."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy_server.url)
    mlflow.set_tracking_uri(proxy_server.url)
    try:
        mlflow.set_experiment("request-cost-retention")
        with mlflow.start_run() as run:
            manager = mlflow_ckpt.CheckpointManager(
                {"w": torch.zeros(16)},
                save_every_n_steps=1,
                async_save=False,
                keep_last_n=2,
                keep_every_n_steps=10,
                timeline=False,
                lease_ttl=3600,
            )
            _saves(manager, range(0, 5))
            early = _saves(manager, range(5, 15))
            _saves(manager, range(15, 65))
            late = _saves(manager, range(65, 75))
            manager.close()
        print(f"with retention, requests per 10 saves: {dict(early)}")
        assert early == late, (early, late)
        assert not any("search" in request for request in late), late
        steps = [c.step for c in mlflow_ckpt.list_checkpoints(run.info.run_id)]
        assert steps == [74, 73, 69, 59, 49, 39, 29, 19, 9]
    finally:
        mlflow.set_tracking_uri(None)

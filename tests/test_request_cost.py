"""What one checkpoint costs the tracking server, counted in a real ``mlflow server``'s
access log: the number of requests per save must not grow with the run's checkpoints."""

from __future__ import annotations

import collections
from collections.abc import Iterator

import mlflow
import pytest
import torch

import mlflow_ckpt
from tests import servers
from tests.records import tracking_at

pytestmark = [pytest.mark.slow, pytest.mark.servers]


# postgres: with tests/test_scale.py on one xdist worker, so one cluster serves both modules
@pytest.fixture(
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.xdist_group("postgres"))]
)
def tracking_server(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[servers.Server]:
    """An ``mlflow server`` (sqlite, or PostgreSQL) as the tracking URI of this test."""
    name = "proxy_server" if request.param == "sqlite" else "postgres_server"
    server = request.getfixturevalue(name)
    with tracking_at(server.url, monkeypatch):
        yield server


def _saves(
    manager: mlflow_ckpt.CheckpointManager, steps: range, server: servers.Server
) -> collections.Counter[str]:
    """The tracking requests the server logged while ``manager`` saved ``steps``."""
    start = servers.log_path(server.name).stat().st_size  # the server's access log
    for step in steps:
        manager.step(step, metrics={"loss": 1.0 / (step + 1)})
    manager.wait()
    return servers.tracking_requests(server, start)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_requests_per_checkpoint_stay_flat(tracking_server: servers.Server, async_save: bool):
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
        _saves(manager, range(0, 5), tracking_server)  # warm up
        early = _saves(manager, range(5, 15), tracking_server)
        _saves(manager, range(15, 60), tracking_server)
        late = _saves(manager, range(60, 70), tracking_server)
        manager.close()
    print(f"{'async' if async_save else 'sync'} requests per 10 saves: {dict(early)}")
    assert early == late, (early, late)  # the same requests, as many: flat
    per_save = sum(early.values()) / 10
    assert per_save <= 10, early
    assert "GET /api/2.0/mlflow/runs/get" not in early  # its cost grows with outputs


def test_requests_per_checkpoint_with_retention_stay_flat(tracking_server: servers.Server):
    """keep_every_n_steps milestones pile up, yet a save does not list the run's
    checkpoints again: the writer keeps track of what it committed and deleted."""
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
        _saves(manager, range(0, 5), tracking_server)
        early = _saves(manager, range(5, 15), tracking_server)
        _saves(manager, range(15, 65), tracking_server)
        late = _saves(manager, range(65, 75), tracking_server)
        manager.close()
    print(f"with retention, requests per 10 saves: {dict(early)}")
    assert early == late, (early, late)
    assert not any("search" in request for request in late), late
    steps = [c.step for c in mlflow_ckpt.list_checkpoints(run.info.run_id)]
    assert steps == [74, 73, 69, 59, 49, 39, 29, 19, 9]

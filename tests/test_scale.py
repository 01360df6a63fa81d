"""At scale: an ``mlflow server`` on PostgreSQL with S3 artifacts, a run of 1,200 checkpoints.

The listing must stay a few paged queries (no request per checkpoint), whatever the store.
1,200 is enough to need two pages of MLflow's 1,000 (seeding each record costs MLflow's own
store tens of milliseconds, so 2,000 took 55-85 s of the suite for no stronger check).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

import mlflow_ckpt
from mlflow_ckpt.cli import main as cli
from tests import servers
from tests.records import committed_record, tracking_at

# One PostgreSQL cluster and mlflow server per xdist worker that asks for one: the tests that
# need them share a group, so `make test` (--dist loadgroup) starts them once.
pytestmark = [pytest.mark.slow, pytest.mark.servers, pytest.mark.xdist_group("postgres")]
N = 1200
BEST = 777  # the step with the lowest loss


@pytest.fixture
def postgres_tracking(
    postgres_server: servers.Server, monkeypatch: pytest.MonkeyPatch
) -> Iterator[servers.Server]:
    with tracking_at(postgres_server.url, monkeypatch):
        yield postgres_server


def _committed(client: MlflowClient, experiment_id: str, run_id: str, step: int) -> None:
    committed_record(
        client,
        experiment_id,
        run_id,
        step,
        loss=abs(step - BEST) / 1000.0,
        timestamp_ms=1_800_000_000_000 + step,
        size_bytes=100,
    )


def test_queries_on_a_run_of_1200_checkpoints(postgres_tracking: servers.Server):
    client = MlflowClient()
    experiment_id = mlflow.create_experiment(f"scale-{time.time_ns()}")
    run = client.create_run(experiment_id, run_name="scale")
    # The records are written straight into the server's database (MLflow's own store, in
    # this process): the same rows the server would write, without thousands of HTTP round trips
    # on two cores. What is measured below, the listing, goes over HTTP.
    seed = MlflowClient(tracking_uri=servers.backend_of(postgres_tracking))
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda s: _committed(seed, experiment_id, run.info.run_id, s), range(N)))

    log = servers.log_path(postgres_tracking.name)
    start = log.stat().st_size
    began = time.perf_counter()
    ckpts = mlflow_ckpt.list_checkpoints(run.info.run_id)
    listed_s = time.perf_counter() - began
    listing = servers.tracking_requests(postgres_tracking, start)
    assert [c.step for c in ckpts] == list(range(N - 1, -1, -1))
    assert listing["POST /api/2.0/mlflow/logged-models/search"] == 2  # pages of 1,000
    assert sum(listing.values()) <= 3, listing  # + one runs/get for the experiment: no N+1

    start = log.stat().st_size
    best = mlflow_ckpt.best_checkpoint(run_id=run.info.run_id, metric="loss", mode="min")
    assert best is not None and best.step == BEST
    across = mlflow_ckpt.best_checkpoint(experiment_ids=[experiment_id], metric="loss")
    assert across is not None and across.step == BEST
    assert sum(servers.tracking_requests(postgres_tracking, start).values()) <= 5
    assert mlflow_ckpt.latest_checkpoint(run.info.run_id).step == N - 1

    result = CliRunner().invoke(cli, ["list", run.info.run_id, "--json"])
    assert result.exit_code == 0 and result.output.count('"model_id"') == N
    print(f"list_checkpoints of {N} checkpoints on PostgreSQL over HTTP: {listed_s:.2f}s")


def test_save_resume_retention_cycle_on_postgres(postgres_tracking: servers.Server):
    mlflow.set_experiment(f"scale-cycle-{time.time_ns()}")
    w = torch.zeros(64)
    with mlflow.start_run() as run:
        manager = mlflow_ckpt.CheckpointManager(
            {"w": w}, save_every_n_steps=1, keep_last_n=2, timeline=False
        )
        for step in range(6):
            w.fill_(float(step))
            manager.step(step, metrics={"loss": 1.0 / (step + 1)})
        manager.close()
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run.info.run_id)] == [5, 4]
    restored = {"w": torch.empty(64)}
    resumed = mlflow_ckpt.CheckpointManager.resume(
        run.info.run_id, restored, save_every_n_steps=1, keep_last_n=2, timeline=False
    )
    assert resumed.start_step == 6 and torch.equal(restored["w"], torch.full((64,), 5.0))
    resumed.step(6)
    resumed.close()
    mlflow.end_run()
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run.info.run_id)] == [6, 5]

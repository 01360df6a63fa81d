"""Two writers on one run: the second is refused unless forced; a forced takeover stops the first.

The processes are real (``tests.crash_child``, which saves every step), so the lease is
exercised with a live heartbeat, real PIDs and commits racing the takeover.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

import mlflow_ckpt
from mlflow_ckpt.catalog import models, tags
from mlflow_ckpt.cli import main as cli
from mlflow_ckpt.errors import WriterConflictError
from mlflow_ckpt.manager.lease import LeaseInfo, _host, read_lease, write_lease
from tests.conftest import ROOT


def _env() -> dict[str, str]:
    return dict(
        os.environ,
        MLFLOW_TRACKING_URI=mlflow.get_tracking_uri(),
        MLFLOW_EXPERIMENT_NAME="tests",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )


def _child(tmp_path: Path, name: str, *extra: str) -> subprocess.Popen[str]:
    log = tmp_path / f"{name}.log"
    args = ["--run-file", str(tmp_path / "run"), "--log", str(log), *extra]
    return subprocess.Popen(
        [sys.executable, "-m", "tests.crash_child", *args],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(log: Path, prefix: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = log.read_text().splitlines() if log.exists() else []
        for line in lines:
            if line.startswith(prefix):
                return line
        time.sleep(0.05)
    raise AssertionError(f"{log.name} never logged {prefix!r}")


@pytest.mark.slow
def test_second_writer_refused_then_forced_takeover_stops_the_first(
    tracking: str, tmp_path: Path
) -> None:
    first = _child(tmp_path, "a")
    try:
        _wait_for(tmp_path / "a.log", "committed 3")
        writer_a = _wait_for(tmp_path / "a.log", "writer").split()[1]
        run_id = (tmp_path / "run").read_text()

        # A preempted job restarted while the first still runs: refused, nothing written.
        second = _child(tmp_path, "b")
        _, err = second.communicate(timeout=120)
        assert second.returncode == 1, err
        assert "WriterConflictError" in err and f"is being written by process {first.pid}" in err
        assert "force=True" in err
        assert "resumed" not in (tmp_path / "b.log").read_text()

        # The operator knows better: force. The first writer is stopped at its next step.
        third = _child(tmp_path, "c", "--force", "--extra-steps", "6")
        resumed = int(_wait_for(tmp_path / "c.log", "resumed").split()[1])
        writer_c = _wait_for(tmp_path / "c.log", "writer").split()[1]
        _, err_a = first.communicate(timeout=60)
        assert first.returncode == 1, err_a
        assert "WriterConflictError" in err_a and "was taken over by" in err_a
        _, err_c = third.communicate(timeout=120)
        assert third.returncode == 0, err_c
    finally:
        for proc in (first,):
            if proc.poll() is None:
                proc.kill()

    # No interleaving: everything committed after the takeover point was written by C, and
    # nothing A wrote after it was committed.
    client = MlflowClient()
    experiment = client.get_run(run_id).info.experiment_id
    every = client.search_logged_models([experiment])
    committed = [m for m in every if m.tags[tags.STATUS] == tags.COMMITTED]
    assert committed
    for model in committed:
        step = int(model.tags[tags.STEP])
        assert model.tags[tags.WRITER] == (writer_c if step > resumed else writer_a), step
    late_a = [
        m for m in every if m.tags[tags.WRITER] == writer_a and int(m.tags[tags.STEP]) > resumed
    ]
    assert all(m.tags[tags.STATUS] != tags.COMMITTED for m in late_a)
    assert mlflow_ckpt.latest_checkpoint(run_id).step == resumed + 6
    assert tags.RUN_WRITER not in client.get_run(run_id).data.tags  # C released it on close


def _lease_of(run_id: str, pid: int, *, age: float, ttl: float = 60.0) -> None:
    """Write the lease as another process holding the run would."""
    lease = LeaseInfo("someone-else", _host(), pid, time.time() - age, ttl)
    client = MlflowClient()
    write_lease(client, run_id, client.get_run(run_id).info.experiment_id, lease)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _state() -> dict[str, object]:
    return {"w": torch.zeros(4)}


def test_live_lease_refuses_force_takes_over(tracking: str, other_process: int) -> None:
    with mlflow.start_run() as run:
        pass
    run_id = run.info.run_id
    _lease_of(run_id, other_process, age=1.0)
    with pytest.raises(WriterConflictError, match=f"process {other_process} on"):
        mlflow_ckpt.CheckpointManager(_state(), run_id=run_id)
    with pytest.raises(WriterConflictError):
        mlflow_ckpt.CheckpointManager.resume(run_id, _state())
    assert mlflow.active_run() is None  # a refused resume leaves the run closed
    mgr = mlflow_ckpt.CheckpointManager(_state(), run_id=run_id, force=True)
    current = LeaseInfo.parse(MlflowClient().get_run(run_id).data.tags[tags.RUN_WRITER])
    assert current is not None and current.owner == mgr.writer_id and current.pid == os.getpid()
    mgr.save(0)
    mgr.close()
    assert tags.RUN_WRITER not in MlflowClient().get_run(run_id).data.tags
    # the experiment tag (the one that is read) too: emptied where MLflow < 3.2 cannot delete it
    assert read_lease(MlflowClient(), run_id, run.info.experiment_id) is None


@pytest.mark.parametrize("why", ["expired", "dead-process"])
def test_stale_lease_is_taken_over_without_force(
    tracking: str, other_process: int, why: str
) -> None:
    with mlflow.start_run() as run:
        pass
    if why == "expired":
        _lease_of(run.info.run_id, other_process, age=120.0, ttl=60.0)
    else:
        _lease_of(run.info.run_id, _dead_pid(), age=1.0)
    with mlflow_ckpt.CheckpointManager(_state(), run_id=run.info.run_id) as mgr:
        mgr.save(0)
    assert mlflow_ckpt.latest_checkpoint(run.info.run_id).step == 0


def test_a_writer_that_lost_its_lease_stops(tracking: str, other_process: int) -> None:
    with mlflow.start_run() as run:
        mgr = mlflow_ckpt.CheckpointManager(_state(), save_every_n_steps=1, async_save=False)
        mgr.step(0)
        _lease_of(run.info.run_id, other_process, age=0.0)  # someone forced a takeover
        with pytest.raises(WriterConflictError, match="was taken over by process"):
            mgr.step(1)
        with pytest.raises(WriterConflictError):
            mgr.step(2)  # it stays stopped
        mgr._shutdown()
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run.info.run_id)] == [0]


def test_gc_leaves_a_live_writers_saves_alone(tracking: str, other_process: int) -> None:
    with mlflow.start_run() as run:
        pass
    run_id = run.info.run_id
    pending = models.create_pending(
        MlflowClient(),
        experiment_id=run.info.experiment_id,
        run_id=run_id,
        step=3,
        epoch=None,
        triggers=("periodic",),
        format="safetensors",
    )
    partial = Path(pending.artifact_location) / ".mlflow-ckpt-tmp-tensors-00000.safetensors.1.ab"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"half a shard")
    _lease_of(run_id, other_process, age=0.0)

    result = CliRunner().invoke(cli, ["gc", run_id])
    assert result.exit_code == 0 and "is being written by process" in result.output
    assert partial.exists()
    status = MlflowClient().get_logged_model(pending.model_id).tags[tags.STATUS]
    assert status == tags.PENDING

    result = CliRunner().invoke(cli, ["gc", run_id, "--force"])
    assert result.exit_code == 0 and "0 adopted" in result.output, result.output
    assert not partial.exists()
    with pytest.raises(MlflowException, match="not found"):  # discarded: files, then model
        MlflowClient().get_logged_model(pending.model_id)
    assert socket.gethostname() in _host()

"""The S3 endpoint dies in the middle of an upload: retried, failed clearly, never listed.

The endpoint is a real TCP proxy in front of the real S3 server (moto): ``down()`` closes its
listening socket and cuts every open connection, so the client sees exactly what a dead server
gives it (reset connections, then refused ones) while the bucket's contents survive for the
"server is back" half of the test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import boto3
import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

import mlflow_ckpt
from mlflow_ckpt.cli import main as cli
from mlflow_ckpt.storage import RetryPolicy, TransferConfig
from mlflow_ckpt.storage.repository import RepositoryStore
from mlflow_ckpt.storage.staging import (
    PREFIX,
    SCRATCH_PREFIX,
    SETTLE_S,
    UNSWEPT_PREFIX,
    OwnedFolder,
    scratch_dir,
    sweep_stale_staging,
)
from tests import servers
from tests.conftest import BUCKET, ROOT, _aws_kwargs
from tests.faultproxy import FaultProxy

MB = 1 << 20


def _keys(s3_server: servers.Server, model_id: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=s3_server.url, **_aws_kwargs())
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return [o["Key"] for page in pages for o in page.get("Contents", []) if model_id in o["Key"]]


@pytest.mark.slow
@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
def test_server_dies_mid_upload_then_comes_back(
    s3_via_proxy: FaultProxy, s3_server: servers.Server, async_save: bool
) -> None:
    state = {"w": torch.randn(6 * MB // 4)}  # 6 MB: the upload is cut after 1 MB
    # transfer=... with 4 shards so the cut lands between and inside parallel uploads
    transfer = TransferConfig(retry=RetryPolicy(attempts=4, base=0.05, cap=0.2))
    with mlflow.start_run(run_name="dead-network") as run:
        mgr = mlflow_ckpt.CheckpointManager(
            state, async_save=async_save, transfer=transfer, max_shard_bytes=2 * MB
        )
        mgr.save(0)
        mgr.wait()
        s3_via_proxy.down_after(1 * MB)
        with pytest.raises(mlflow_ckpt.CheckpointWriteError) as info:
            mgr.save(1)
            mgr.wait()  # async: the failure surfaces here
        assert s3_via_proxy.is_down
        message = str(info.value)
        assert run.info.run_id in message and "step 1" in message
        assert f"s3://{BUCKET}/faults-" in message and "retries exhausted" in message
        assert "the checkpoint of step 0 is still intact" in message
        assert [c.step for c in mlflow_ckpt.list_checkpoints(run.info.run_id)] == [0]

        s3_via_proxy.up()  # the server is back: the next save works
        mgr.save(2)
        mgr.close()
    run_id = run.info.run_id
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run_id)] == [2, 0]
    restored = {"w": torch.zeros_like(state["w"])}
    mlflow_ckpt.load(mlflow_ckpt.latest_checkpoint(run_id), restored)
    assert torch.equal(restored["w"], state["w"])

    # The failed save is recorded as FAILED while its bytes cannot be removed; gc removes them.
    client = MlflowClient()
    failed = [
        m
        for m in client.search_logged_models([run.info.experiment_id])
        if m.tags.get("mlflow_ckpt.status") == "failed"
    ]
    assert [m.tags["mlflow_ckpt.step"] for m in failed] == ["1"]
    gc = CliRunner().invoke(cli, ["gc", run_id], catch_exceptions=False)
    assert gc.exit_code == 0, gc.output
    assert "1 failed save(s) removed" in gc.output
    assert _keys(s3_server, failed[0].model_id) == []
    # its bytes gone, its LoggedModel is deleted too (no "Failed" row left in the Models tab)
    assert failed[0].model_id not in {
        m.model_id for m in client.search_logged_models([run.info.experiment_id])
    }


# A process that makes an owned folder, prints it, then holds it ("hold"), dies as under
# kill -9 ("exit"), or holds it having made it with no file descriptor left ("starved").
_OWNER = """
import os, resource, sys, tempfile, time
from mlflow_ckpt.storage.staging import OwnedFolder
held = []
if sys.argv[2] == "starved":
    tempfile.gettempdir()  # (it tries a file there: before the descriptors run out)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    try:
        while True:
            held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
folder = OwnedFolder(sys.argv[1], "test")
if not held:
    (folder.path / "tensors-00001-of-00002.safetensors").write_bytes(b"x" * 100)
print(folder.path, flush=True)
os._exit(9) if sys.argv[2] == "exit" else time.sleep(120)
"""


def _owned_by_child(prefix: str, then: str) -> tuple[subprocess.Popen[str], Path]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=tempfile.gettempdir())
    child = subprocess.Popen(
        [sys.executable, "-c", _OWNER, prefix, then], stdout=subprocess.PIPE, text=True, env=env
    )
    assert child.stdout is not None
    return child, Path(child.stdout.readline().strip())


def _age(folder: Path) -> Path:
    """Make ``folder`` look older than the sweep's settling time."""
    old = time.time() - 10 * SETTLE_S
    os.utime(folder, (old, old))
    return folder


@pytest.mark.parametrize("prefix", [PREFIX, SCRATCH_PREFIX], ids=["upload", "scratch"])
def test_gc_removes_folders_left_by_killed_processes(
    tracking: str, own_tempdir: Path, prefix: str
) -> None:
    """Upload staging and scratch folders (a load's, an archive's...) of a dead process.

    The owner is told by the folder's lock, not by the PID in its name: a live folder named
    after a PID that is dead here (another container's, numbered in its own namespace) is
    kept. A folder still under its hidden name (made, perhaps not locked yet) is kept until
    it is older than the settling time."""
    dead, stale = _owned_by_child(prefix, "exit")
    assert dead.wait(timeout=60) == 9
    alive, busy = _owned_by_child(prefix, "hold")
    elsewhere = busy.with_name(f"{prefix}{dead.pid}-test{uuid.uuid4().hex[:6]}")
    busy.rename(elsewhere)  # the lock goes with the folder: still held by a live process
    alive_too, busy = _owned_by_child(prefix, "hold")
    unlocked = Path(tempfile.mkdtemp(prefix=f"{prefix}{dead.pid}-"))  # an older version's
    hidden_new = Path(tempfile.mkdtemp(prefix=f".{prefix}{dead.pid}-"))
    hidden_old = _age(Path(tempfile.mkdtemp(prefix=f".{prefix}{dead.pid}-")))
    try:
        with mlflow.start_run() as run:
            pass
        result = CliRunner().invoke(cli, ["gc", run.info.run_id])
        assert result.exit_code == 0, result.output
        assert not stale.exists() and not unlocked.exists()  # nobody holds them
        assert busy.exists() and elsewhere.exists()  # a save may be staging there right now
        assert hidden_new.exists() and not hidden_old.exists()
    finally:
        for child in (alive, alive_too):
            child.kill()
            child.wait()
        for folder in (stale, busy, elsewhere, unlocked, hidden_new, hidden_old):
            shutil.rmtree(folder, ignore_errors=True)


def test_a_folder_its_owner_cannot_lock_is_named_out_of_the_sweeps_reach(
    own_tempdir: Path,
) -> None:
    """Out of file descriptors, the owner cannot lock its folder; under a sweepable name any
    other process could then lock it and take it mid-use, so it is named to be left alone."""
    child, folder = _owned_by_child(SCRATCH_PREFIX, "starved")
    try:
        assert folder.name.startswith(f"{UNSWEPT_PREFIX}.{SCRATCH_PREFIX}"), folder
        assert sweep_stale_staging() == [] and folder.is_dir()
    finally:
        child.kill()
        child.wait()


def test_flush_returns_once_the_staged_upload_folder_is_gone(
    own_tempdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store that stages uploads on local disk (any MLflow artifact repository we have no
    streaming sink for) has removed the staging folder when ``flush()`` returns. Removal is
    slowed down here so that the order shows every time."""
    remove = OwnedFolder.remove

    def slow_remove(folder: OwnedFolder) -> None:
        time.sleep(0.3)
        remove(folder)

    monkeypatch.setattr(OwnedFolder, "remove", slow_remove)
    store = RepositoryStore((tmp_path / "art").as_uri())
    try:
        with store.open_writer("ckpt/f.bin") as f:
            f.write(b"x" * 1000)
        assert [p.name[: len(PREFIX)] for p in own_tempdir.iterdir()] == [PREFIX]  # staged
        store.flush()
        assert list(own_tempdir.iterdir()) == []
        assert (tmp_path / "art" / "ckpt" / "f.bin").read_bytes() == b"x" * 1000
    finally:
        store.close()


def test_a_scratch_folder_is_named_after_its_process_and_removed_on_exit(own_tempdir: Path) -> None:
    with pytest.raises(RuntimeError), scratch_dir("load") as folder:
        assert folder.name.startswith(f"{SCRATCH_PREFIX}{os.getpid()}-load-")
        (folder / "f.bin").write_bytes(b"x")
        assert sweep_stale_staging() == []  # this process holds it
        raise RuntimeError("a failed load")
    assert not folder.exists()

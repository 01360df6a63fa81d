"""The cold tier in place: retention's archive outcome, ``mlflow-ckpt archive|unarchive``,
storage classes read back from each store, recompression where a store has none."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

import mlflow_ckpt
from mlflow_ckpt.catalog import tags
from mlflow_ckpt.catalog.archive import archive_checkpoint, unarchive_checkpoint
from mlflow_ckpt.cli import main as cli
from mlflow_ckpt.codec import MANIFEST_NAME, Manifest
from mlflow_ckpt.errors import CheckpointError
from mlflow_ckpt.manager import retention
from mlflow_ckpt.storage import TEMP_MARKER, open_store
from tests.conftest import StoreUnderTest
from tests.faultproxy import fault_proxy


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh())
        self.out = torch.nn.Linear(256, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x))


def train(model: Net, opt: torch.optim.Optimizer) -> float:
    loss = model(torch.randn(16, 64)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def own_files(ckpt: mlflow_ckpt.Checkpoint) -> list[str]:
    """The files of a checkpoint's own folder, as its manifest lists them (+ the manifest)."""
    store = open_store(ckpt.artifact_location)
    data = store.read_bytes(MANIFEST_NAME, Path("/tmp"))
    listed = [f.path for f in Manifest.from_json(data, "test").files]
    return [*(p for p in listed if not p.startswith("@")), MANIFEST_NAME]


def test_archive_after_n_archives_old_milestones_and_every_one_still_loads(
    tracking: str,
) -> None:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    saved = {}
    with mlflow.start_run(run_name="tiers") as run:
        with mlflow_ckpt.CheckpointManager(
            {"model": model, "optimizer": opt},
            save_every_n_steps=1,
            monitor="loss",
            keep_last_n=2,
            keep_every_n_steps=3,
            archive_after_n=2,
            model_factory="tests.test_archive:Net",
            async_save=True,
            timeline=False,
        ) as mgr:
            for step in range(9):
                mgr.step(step, {"loss": train(model, opt)})
                saved[step] = {k: v.clone() for k, v in model.state_dict().items()}
    run_id = run.info.run_id
    ckpts = {c.step: c for c in mlflow_ckpt.list_checkpoints(run_id)}
    # milestones 2, 5, 8 are kept; 2 and 5 are older than the 2 newest (7, 8): archived
    assert sorted(ckpts) == [2, 5, 7, 8]
    assert {s: c.tier for s, c in ckpts.items()} == {
        2: "archive",
        5: "archive",
        7: "hot",
        8: "hot",
    }
    for step in (2, 5):
        ckpt = ckpts[step]
        tensor_files = [p for p in own_files(ckpt) if "tensors" in p]
        assert tensor_files and all(re.match(r"archive/.*\.ztensors$", p) for p in tensor_files)
        assert ckpt.stored_bytes < ckpt.size_bytes  # recompressed (a local store)
        assert not list(Path(ckpt.artifact_location).glob("*.safetensors"))  # old files gone
        tags_now = MlflowClient().get_logged_model(ckpt.model_id).tags
        assert tags_now[tags.ARCHIVED_FROM] == "none" and tags.MANIFEST_SHA256_NEXT not in tags_now
    for step, ckpt in ckpts.items():  # archived or not, each restores its own step exactly
        fresh = Net()
        mlflow_ckpt.load(ckpt, {"model": fresh})
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved[step].items())
    batch = np.ones((2, 64), dtype=np.float32)
    served = mlflow.pyfunc.load_model(ckpts[2].uri).predict(batch)
    model.load_state_dict(saved[2])
    np.testing.assert_allclose(served, model.eval()(torch.from_numpy(batch)).detach().numpy())
    best = mlflow_ckpt.best_checkpoint(run_id=run_id, metric="loss")
    assert best is not None and best.step in ckpts
    out = CliRunner().invoke(cli, ["list", run_id])
    assert out.exit_code == 0 and "tier" in out.output and "archive" in out.output, out.output
    assert CliRunner().invoke(cli, ["verify", run_id]).exit_code == 0
    # unarchive: back to plain safetensors in the folder, hot, exact
    result = CliRunner().invoke(cli, ["unarchive", ckpts[2].uri])
    assert result.exit_code == 0 and "unarchived" in result.output, result.output
    back = next(c for c in mlflow_ckpt.list_checkpoints(run_id) if c.step == 2)
    assert back.tier == "hot" and back.stored_bytes == back.size_bytes
    assert all(not p.startswith("archive/") for p in own_files(back))
    fresh = Net()
    mlflow_ckpt.load(back, {"model": fresh})
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved[2].items())
    again = CliRunner().invoke(cli, ["archive", back.uri, "--level", "9"])
    assert again.exit_code == 0 and "zstd-9" in again.output, again.output


def test_the_next_snapshot_never_waits_for_an_archive(
    tracking: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Archiving is a background job of its own: a save due while a milestone is still
    being archived takes its snapshot and returns. (Before, the archive ran inside the
    previous save's job, and the next snapshot waited for it: seconds per GB locally.)"""
    started, snapshotted = threading.Event(), threading.Event()
    seen: list[bool] = []
    real = retention.archive_checkpoint

    def archive_after_the_next_snapshot(ckpt: mlflow_ckpt.Checkpoint, **kwargs: object) -> None:
        started.set()
        seen.append(snapshotted.wait(60))  # False only if the next save waited for us
        real(ckpt, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(retention, "archive_checkpoint", archive_after_the_next_snapshot)
    state = {"w": torch.zeros(1000)}
    with mlflow.start_run(run_name="archive-behind"):
        with mlflow_ckpt.CheckpointManager(
            state,
            save_every_n_steps=1,
            keep_last_n=1,
            keep_every_n_steps=2,  # milestones: steps 1, 3
            archive_after_n=1,
            async_save=True,
            save_last=False,
            timeline=False,
        ) as mgr:
            for step in range(3):
                state["w"].add_(1.0)
                mgr.step(step)
            assert started.wait(60)  # milestone 1 is being archived, after step 2's save
            state["w"].add_(1.0)
            mgr.step(3)  # a save: its snapshot must not wait for the archive
            snapshotted.set()
            mgr.wait()
            run_id = mgr.run_id
    assert seen == [True]
    tiers = {c.step: c.tier for c in mlflow_ckpt.list_checkpoints(run_id)}
    assert tiers == {3: "hot", 1: "archive"}, tiers
    restored = {"w": torch.zeros(1000)}
    mlflow_ckpt.load(mlflow_ckpt.list_checkpoints(run_id)[1], restored)
    assert torch.equal(restored["w"], torch.full((1000,), 2.0))


def test_archive_arguments_are_checked(tracking: str) -> None:
    with pytest.raises(ValueError, match="pass keep_every_n_steps= too"):
        mlflow_ckpt.CheckpointManager({"w": torch.zeros(2)}, archive_after_n=2)
    assert mlflow.active_run() is None
    with mlflow.start_run(run_name="local") as run:
        with mlflow_ckpt.CheckpointManager({"w": torch.zeros(2)}, timeline=False) as mgr:
            mgr.save(0)
    ckpt = mlflow_ckpt.latest_checkpoint(run.info.run_id)
    with pytest.raises(CheckpointError, match="has no storage classes"):
        archive_checkpoint(ckpt, storage_class="GLACIER_IR")  # type: ignore[arg-type]
    usage = CliRunner().invoke(cli, ["gc", run.info.run_id, "--archive-after", "1"])
    assert usage.exit_code == 2 and "--keep-every" in usage.output


def test_an_interrupted_recompression_still_loads_and_is_finished_by_a_rerun(
    tracking: str,
) -> None:
    """A crash between the manifest swap and the tags: the readers accept the new manifest
    by its pending digest, and archiving again only settles the tags."""
    from mlflow_ckpt.catalog import rewrite

    torch.manual_seed(1)
    model = Net()
    with mlflow.start_run(run_name="crash") as run:
        with mlflow_ckpt.CheckpointManager({"model": model}, timeline=False) as mgr:
            mgr.save(0)
    ckpt = mlflow_ckpt.latest_checkpoint(run.info.run_id)
    assert ckpt is not None
    real_settle = rewrite.settle

    class Killed(Exception):
        pass

    def crash(*args: object, **kwargs: object) -> None:
        raise Killed

    rewrite.settle = crash  # type: ignore[assignment]
    try:
        with pytest.raises(Killed):
            archive_checkpoint(ckpt)
    finally:
        rewrite.settle = real_settle  # type: ignore[assignment]
    pending = MlflowClient().get_logged_model(ckpt.model_id).tags
    assert tags.MANIFEST_SHA256_NEXT in pending and pending.get(tags.TIER) != tags.ARCHIVE
    fresh = Net()
    mlflow_ckpt.load(ckpt, {"model": fresh})  # the new manifest, accepted by its digest
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    # what a kill in the middle of writing a file leaves (a local store's temporary name)
    leftover = Path(ckpt.artifact_location) / "archive" / f"{TEMP_MARKER}tensors.x.1.ab"
    leftover.write_bytes(b"partial")
    archive_checkpoint(ckpt)
    assert not leftover.exists()
    settled = MlflowClient().get_logged_model(ckpt.model_id).tags
    assert settled[tags.TIER] == tags.ARCHIVE and tags.MANIFEST_SHA256_NEXT not in settled
    assert CliRunner().invoke(cli, ["verify", ckpt.uri]).exit_code == 0


EXPECTED_CLASS = {"s3": "GLACIER_IR", "azure": "Cool", "gcs": "COLDLINE"}
HOT_CLASS = {"s3": "STANDARD", "azure": "Hot", "gcs": "STANDARD"}


def test_archive_in_place_on_every_store(
    store: StoreUnderTest, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(2)
    model = Net()
    with mlflow.start_run(run_name=f"tier-{store.name}") as run:
        with mlflow_ckpt.CheckpointManager({"model": model}, timeline=False) as mgr:
            mgr.save(0)
    ckpt = mlflow_ckpt.latest_checkpoint(run.info.run_id)
    assert ckpt is not None
    keys_before = set(store.list_keys())
    if store.name == "gcs":
        # fake-gcs-server accepts a rewrite but keeps the class: check the request we send
        server = request.getfixturevalue("gcs_server")
        with fault_proxy(server.port, record=True) as tap:
            monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{tap.port}")
            try:
                how = archive_checkpoint(ckpt)
            finally:
                monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.url)
        sent = bytes(tap.sent or b"")
        rewrites = re.findall(rb"POST /storage/v1/b/[^ ]+/rewriteTo/[^ ]+", sent)
        assert len(rewrites) == len(own_files(ckpt)), sent[:2000]
        assert sent.count(b'"storageClass": "COLDLINE"') >= len(rewrites), sent[:2000]
    else:
        how = archive_checkpoint(ckpt)
    archived = next(iter(mlflow_ckpt.list_checkpoints(run.info.run_id)))
    assert archived.tier == "archive"
    own = open_store(ckpt.artifact_location)
    if store.name in EXPECTED_CLASS:
        assert how == EXPECTED_CLASS[store.name]
        assert set(store.list_keys()) == keys_before  # in place: the same objects
        if store.name != "gcs":  # read back from the store's own metadata
            assert {own.storage_class(p) for p in own_files(ckpt)} == {how}
    else:  # local folder, mlflow server: recompressed
        assert how.startswith("zstd-") and archived.stored_bytes < archived.size_bytes
    fresh = Net()
    mlflow_ckpt.load(archived, {"model": fresh})
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    unarchive_checkpoint(archived)
    hot = next(iter(mlflow_ckpt.list_checkpoints(run.info.run_id)))
    assert hot.tier == "hot"
    if store.name in ("s3", "azure"):
        assert {own.storage_class(p) for p in own_files(hot)} == {HOT_CLASS[store.name]}
    mlflow_ckpt.load(hot, {"model": fresh})
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())

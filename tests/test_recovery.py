"""Saves killed between their manifest and their commit tag are adopted on resume."""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

import mlflow_ckpt
from mlflow_ckpt.catalog import models
from mlflow_ckpt.codec import Manifest, write_manifest, write_state
from mlflow_ckpt.snapshot import take_snapshot
from mlflow_ckpt.storage import open_store


def history(run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in MlflowClient().get_metric_history(run_id, key))


def test_killed_after_metrics_before_tag_is_adopted(tracking: str) -> None:
    model = torch.nn.Linear(2, 2)
    with mlflow.start_run(run_name="r") as run:
        with mlflow_ckpt.CheckpointManager({"model": model}, save_every_n_steps=5) as mgr:
            for s in range(5):
                mgr.step(s, {"loss": float(s)})
    run_id = run.info.run_id
    (ckpt,) = mlflow_ckpt.list_checkpoints(run_id)
    # what a kill right before the commit tag leaves: metrics and link logged, tag pending
    MlflowClient().set_logged_model_tags(ckpt.model_id, {"mlflow_ckpt.status": "pending"})
    assert mlflow_ckpt.list_checkpoints(run_id) == []
    mgr = mlflow_ckpt.CheckpointManager.resume(run_id, {"model": torch.nn.Linear(2, 2)})
    assert mgr.start_step == 5 and mgr.resumed_from.model_id == ckpt.model_id
    mgr.close()
    assert history(run_id, "loss") == [0, 1, 2, 3, 4]
    assert str(MlflowClient().get_logged_model(ckpt.model_id).status) == "READY"


def test_killed_after_manifest_before_metrics_is_adopted_with_its_metrics(tracking: str) -> None:
    model = torch.nn.Linear(2, 2)
    client = MlflowClient()
    with mlflow.start_run(run_name="r") as run:
        pass
    run_id = run.info.run_id
    for s in range(3):
        client.log_metric(run_id, "loss", float(s), step=s)
    # a save of step 3 whose process died right after writing its manifest
    pending = models.create_pending(
        client,
        experiment_id=run.info.experiment_id,
        run_id=run_id,
        step=3,
        epoch=None,
        triggers=("periodic",),
        format="safetensors",
    )
    store = open_store(pending.artifact_location)
    snap = take_snapshot({"model": model}, {"step": 3, "metrics": {"loss": 3.0}})
    files = write_state(store, snap.document, snap.tensors, format="safetensors")
    write_manifest(
        store,
        Manifest(
            format="safetensors",
            step=3,
            epoch=None,
            metrics={"loss": 3.0},
            created_at=time.time(),
            files=files.files,
            tensors=files.tensors,
            structure_file="state.json",
        ),
    )
    # and one that died before its manifest: discarded, files removed
    broken = models.create_pending(
        client,
        experiment_id=run.info.experiment_id,
        run_id=run_id,
        step=4,
        epoch=None,
        triggers=("periodic",),
        format="safetensors",
    )
    open_store(broken.artifact_location).write_bytes("state.json", b"{}")

    mgr = mlflow_ckpt.CheckpointManager.resume(run_id, {"model": torch.nn.Linear(2, 2)})
    assert mgr.start_step == 4
    mgr.close()
    (ckpt,) = mlflow_ckpt.list_checkpoints(run_id)
    assert ckpt.model_id == pending.model_id and ckpt.metrics == {"loss": 3.0}
    assert history(run_id, "loss") == [0, 1, 2, 3]
    assert not (Path(broken.artifact_location) / "state.json").exists()
    # its files gone, its LoggedModel is deleted too: no "Failed" row in the Models tab
    with pytest.raises(MlflowException, match="not found"):
        client.get_logged_model(broken.model_id)
    assert broken.model_id not in {
        m.model_id for m in client.search_logged_models([run.info.experiment_id])
    }


def test_a_pending_save_that_cannot_be_read_now_is_never_deleted(tracking: str) -> None:
    model = torch.nn.Linear(2, 2)
    with mlflow.start_run(run_name="r") as run:
        with mlflow_ckpt.CheckpointManager({"model": model}, async_save=False) as mgr:
            mgr.save(0)
            mgr.save(1)
    run_id = run.info.run_id
    newest = mlflow_ckpt.latest_checkpoint(run_id)
    folder = Path(newest.artifact_location)
    files = sorted(p.name for p in folder.iterdir())
    # A kill before the commit tag, and a manifest this version cannot read (written by a
    # newer mlflow_ckpt): complete as far as anyone knows, so recovery must keep it.
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps(dict(manifest, format_version=99)))
    MlflowClient().set_logged_model_tags(
        newest.model_id, {"mlflow_ckpt.status": "pending", "mlflow_ckpt.manifest_sha256": ""}
    )
    mgr = mlflow_ckpt.CheckpointManager.resume(run_id, {"model": torch.nn.Linear(2, 2)})
    assert mgr.resumed_from.step == 0
    mgr.close()
    mlflow.end_run()
    tags = MlflowClient().get_logged_model(newest.model_id).tags
    assert tags["mlflow_ckpt.status"] == "pending"  # left for a later resume or gc
    assert sorted(p.name for p in folder.iterdir()) == files

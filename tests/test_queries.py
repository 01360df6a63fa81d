"""Catalog queries answered by MLflow: the newest checkpoint of a run without listing it."""

from __future__ import annotations

import time
from typing import Any

import mlflow
import pytest
import torch
from mlflow import MlflowClient

import mlflow_ckpt
from mlflow_ckpt.catalog import models
from mlflow_ckpt.catalog.reader import newest_verified
from mlflow_ckpt.storage import local_path_of
from tests.records import committed_record


class CountingClient(MlflowClient):
    """A real client that counts its LoggedModel searches (and what they asked for)."""

    def __init__(self) -> None:
        super().__init__()
        self.searches: list[dict[str, Any]] = []

    def search_logged_models(self, *args: Any, **kwargs: Any) -> Any:
        self.searches.append(kwargs)
        return super().search_logged_models(*args, **kwargs)


def _records(steps: list[int]) -> str:
    """A run whose committed checkpoints have ``steps``, created in that order."""
    client = MlflowClient()
    with mlflow.start_run() as run:
        pass
    for step in steps:
        committed_record(
            client, run.info.experiment_id, run.info.run_id, step, loss=1.0 / (step + 1)
        )
        time.sleep(0.003)  # (creation times in milliseconds: each its own)
    return run.info.run_id


def test_latest_checkpoint_is_three_one_model_requests_at_any_length(tracking: str) -> None:
    run_id = _records(list(range(13)))  # names of one and two digits: "...-9" > "...-12"
    client = CountingClient()
    latest = mlflow_ckpt.latest_checkpoint(run_id, client=client)
    assert latest is not None and latest.step == 12
    assert len(client.searches) == 3
    assert all(s["max_results"] == 1 for s in client.searches)
    assert latest == mlflow_ckpt.list_checkpoints(run_id)[0]


def test_latest_checkpoint_when_steps_went_down_or_repeat(tracking: str) -> None:
    # the newest checkpoint (step 7) is not the highest: the run is listed instead
    run_id = _records([100, 101, 7])
    client = CountingClient()
    latest = mlflow_ckpt.latest_checkpoint(run_id, client=client)
    assert latest is not None and latest.step == 101
    assert len(client.searches) == 3  # newest, a longer name exists, then the listing
    # two checkpoints of the highest step: the newer one, as list_checkpoints orders them
    run_id = _records([5, 9, 9])
    listed = mlflow_ckpt.list_checkpoints(run_id)
    latest = mlflow_ckpt.latest_checkpoint(run_id)
    assert latest is not None and latest.step == 9
    assert latest.model_id == listed[0].model_id != listed[1].model_id
    assert listed[0].created_at >= listed[1].created_at


def test_a_checkpoint_named_otherwise_makes_latest_list_the_run(tracking: str) -> None:
    run_id = _records([3, 4])
    client = MlflowClient()
    run = client.get_run(run_id)
    odd = client.create_logged_model(
        experiment_id=run.info.experiment_id,
        name="imported-from-elsewhere",
        source_run_id=run_id,
        tags={"mlflow_ckpt.step": "50", "mlflow_ckpt.status": "pending"},
    )
    models.commit(
        client,
        odd,
        run_id=run_id,
        step=50,
        metrics={},
        timestamp_ms=1,
        size_bytes=1,
        manifest_sha256="0" * 64,
    )
    latest = mlflow_ckpt.latest_checkpoint(run_id)
    assert latest is not None and latest.step == 50 and latest.model_id == odd.model_id


def test_resume_finds_the_newest_without_listing_the_run(tracking: str) -> None:
    state = {"w": torch.zeros(4)}
    with mlflow.start_run() as run:
        with mlflow_ckpt.CheckpointManager(
            state, async_save=False, timeline=False, keep_last_n=20
        ) as mgr:
            for step in range(12):
                state["w"].add_(1.0)
                mgr.save(step)
    client = CountingClient()
    verified = newest_verified(run.info.run_id, client)
    assert verified is not None and verified.checkpoint.step == 11
    assert [s["max_results"] for s in client.searches] == [1, 1, 1]
    # the newest is damaged: the run is listed and the one before it restored
    folder = local_path_of(verified.checkpoint.artifact_location)
    assert folder is not None
    (tensors,) = folder.glob("*.safetensors")
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF
    tensors.write_bytes(bytes(data))
    client = CountingClient()
    with pytest.warns(UserWarning, match="Skipping checkpoint .* step 11"):
        verified = newest_verified(run.info.run_id, client)
    assert verified is not None and verified.checkpoint.step == 10
    assert [s["max_results"] for s in client.searches][:3] == [1, 1, 1]
    assert len(client.searches) == 4  # and one page of the listing

"""Every kind of on-disk damage is detected, named, skipped by resume and remembered.

Damage: a flipped byte, a truncated file, a deleted file, an edited manifest, two files
swapped. For each: ``load`` raises ``CheckpointCorruptedError`` naming the file, ``mlflow-ckpt
verify`` exits 1 listing it, ``resume`` warns and falls back to the newest good checkpoint, the
bad one is tagged ``mlflow_ckpt.status=corrupt``, and the next resume skips it unread.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

import mlflow_ckpt
from mlflow_ckpt.cli import main as cli


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64))


def _shards(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith("tensors-"))


def flip(folder: Path) -> str:
    shard = _shards(folder)[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    return shard.name


def truncate(folder: Path) -> str:
    shard = _shards(folder)[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    return shard.name


def delete(folder: Path) -> str:
    shard = _shards(folder)[0]
    shard.unlink()
    return shard.name


def edit_manifest(folder: Path) -> str:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["metrics"]["val_loss"] = 0.0  # make a bad checkpoint look best
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return "manifest.json"


def swap(folder: Path) -> str:
    first, second = _shards(folder)[:2]
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)
    return f"{first.name}|{second.name}"  # either may be reported first


DAMAGE: dict[str, Callable[[Path], str]] = {
    "flip": flip,
    "truncate": truncate,
    "delete": delete,
    "edit-manifest": edit_manifest,
    "swap": swap,
}


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damage_is_detected_named_skipped_and_remembered(
    tracking: str, damage: str, fmt: str
) -> None:
    torch.manual_seed(0)
    model = _net()  # two equal 16 KiB weight matrices: one shard each
    with mlflow.start_run(run_name="damaged") as run:
        with mlflow_ckpt.CheckpointManager(
            {"model": model}, format=fmt, async_save=False, max_shard_bytes=20_000
        ) as mgr:
            mgr.save(0, {"val_loss": 1.0})
            with torch.no_grad():
                model[0].weight.add_(1.0)
            mgr.save(1, {"val_loss": 0.5})
    run_id = run.info.run_id
    good, bad = sorted(mlflow_ckpt.list_checkpoints(run_id), key=lambda c: c.step)
    assert len(_shards(Path(bad.artifact_location))) >= 2
    name = DAMAGE[damage](Path(bad.artifact_location))

    fresh = _net()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(mlflow_ckpt.CheckpointCorruptedError) as info:
        mlflow_ckpt.load(bad, {"model": fresh})
    names = name.split("|")
    assert info.value.path in names and info.value.path in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())

    result = CliRunner().invoke(cli, ["verify", run_id])
    assert result.exit_code == 1
    assert f"CORRUPT {bad.model_id}" in result.output
    assert all(n in result.output for n in names)  # verify lists every bad file
    assert f"ok      {good.model_id}" in result.output

    with pytest.warns(UserWarning, match=f"Skipping checkpoint {bad.uri}"):
        resumed = mlflow_ckpt.CheckpointManager.resume(run_id, {"model": fresh})
    assert resumed.resumed_from.step == 0 and resumed.start_step == 1
    resumed.close()
    mlflow.end_run()
    assert MlflowClient().get_logged_model(bad.model_id).tags["mlflow_ckpt.status"] == "corrupt"
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run_id)] == [0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the corrupt checkpoint is not even read again
        again = mlflow_ckpt.CheckpointManager.resume(run_id, {"model": _net()})
        assert again.resumed_from.step == 0
        again.close()
        mlflow.end_run()

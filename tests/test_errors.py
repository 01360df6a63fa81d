"""Bad input gets a clear error of our own type, and nothing is written half-way."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

import mlflow_ckpt


def net(width: int = 4) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(3, width), torch.nn.ReLU(), torch.nn.Linear(width, 2)
    )


def saved_run(
    fmt: str = "safetensors", steps: tuple[int, ...] = (0,)
) -> tuple[str, torch.nn.Module]:
    model = net()
    with mlflow.start_run(run_name="saved") as run:
        with mlflow_ckpt.CheckpointManager({"model": model}, format=fmt, async_save=False) as mgr:
            for s in steps:
                mgr.save(s)
    return run.info.run_id, model


def test_no_active_run_and_no_run_id(tracking: str) -> None:
    with pytest.raises(mlflow_ckpt.errors.NoActiveRunError, match=r"mlflow\.start_run"):
        mlflow_ckpt.CheckpointManager({"model": net()})


def test_unknown_run_id_everywhere(tracking: str) -> None:
    bogus = "0123456789abcdef0123456789abcdef"
    with pytest.raises(mlflow_ckpt.CheckpointNotFoundError, match=bogus):
        mlflow_ckpt.CheckpointManager({"model": net()}, run_id=bogus)
    with pytest.raises(mlflow_ckpt.CheckpointNotFoundError, match="MLFLOW_TRACKING_URI"):
        mlflow_ckpt.CheckpointManager.resume(bogus, {"model": net()})
    with pytest.raises(mlflow_ckpt.CheckpointNotFoundError):
        mlflow_ckpt.list_checkpoints(bogus)


def test_unknown_model_id_and_bad_uri(tracking: str) -> None:
    missing = "m-" + "0" * 32
    with pytest.raises(mlflow_ckpt.CheckpointNotFoundError, match=missing):
        mlflow_ckpt.load(f"models:/{missing}", {"model": net()})
    with pytest.raises(mlflow_ckpt.CheckpointNotFoundError, match="not a checkpoint URI"):
        mlflow_ckpt.load("s3://bucket/whatever", {"model": net()})


def test_architecture_mismatch_lists_names_and_touches_nothing(tracking: str) -> None:
    run_id, _ = saved_run()
    other = torch.nn.Sequential(
        torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2), torch.nn.Linear(2, 2)
    )
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(mlflow_ckpt.StateMismatchError) as info:
        mlflow_ckpt.load(mlflow_ckpt.latest_checkpoint(run_id), {"model": other})
    err = info.value
    assert err.missing == ["model.3.weight", "model.3.bias"]
    assert err.unexpected == []
    assert sorted(err.mismatched) == sorted(
        [
            "model.0.weight (checkpoint [4, 3], model [8, 3])",
            "model.0.bias (checkpoint [4], model [8])",
            "model.2.weight (checkpoint [2, 4], model [2, 8])",
        ]
    )
    assert "model.3.weight" in str(err) and "nothing was restored" in str(err)
    for key, value in other.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_unexpected_keys_in_module_and_state(tracking: str) -> None:
    run_id, _ = saved_run()
    smaller = torch.nn.Sequential(torch.nn.Linear(3, 4))
    with pytest.raises(mlflow_ckpt.StateMismatchError) as info:
        mlflow_ckpt.load(mlflow_ckpt.latest_checkpoint(run_id), {"model": smaller})
    assert info.value.unexpected == ["model.2.weight", "model.2.bias"]
    with pytest.raises(mlflow_ckpt.StateMismatchError) as info:
        mlflow_ckpt.load(mlflow_ckpt.latest_checkpoint(run_id), {"model": net(), "opt": {}})
    assert info.value.missing == ["opt"]


def test_optimizer_group_mismatch_leaves_model_untouched(tracking: str) -> None:
    model = net()
    opt = torch.optim.AdamW(model.parameters())
    with mlflow.start_run(run_name="o") as run:
        with mlflow_ckpt.CheckpointManager({"model": model, "opt": opt}, async_save=False) as mgr:
            mgr.save(0)
    fresh = net()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    wrong_opt = torch.optim.AdamW(list(fresh.parameters())[:2])
    with pytest.raises(mlflow_ckpt.StateMismatchError, match="parameter groups"):
        mlflow_ckpt.load(
            mlflow_ckpt.latest_checkpoint(run.info.run_id), {"model": fresh, "opt": wrong_opt}
        )
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, before[key])


def test_non_serialisable_object_is_named_and_nothing_is_written(tracking: str) -> None:
    with mlflow.start_run(run_name="bad") as run:
        with pytest.raises(mlflow_ckpt.errors.StateSerializationError) as info:
            mlflow_ckpt.CheckpointManager({"model": net(), "extra": {"callback": print}})
    assert "extra/callback" in str(info.value) and "Stateful" in str(info.value)
    assert "state_dict()" in str(info.value)
    exp = run.info.experiment_id
    assert MlflowClient().search_logged_models([exp]) == []


def test_resume_refuses_checkpoint_entries_missing_from_state(tracking: str) -> None:
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with mlflow.start_run(run_name="r") as run:
        with mlflow_ckpt.CheckpointManager({"model": model, "opt": opt}, async_save=False) as mgr:
            mgr.save(0)
    with pytest.raises(mlflow_ckpt.StateMismatchError) as info:
        mlflow_ckpt.CheckpointManager.resume(run.info.run_id, {"model": net()})
    assert info.value.unexpected == ["opt"]
    assert mlflow.active_run() is None  # the run was not reopened
    assert "mlflow_ckpt.resumes" not in MlflowClient().get_run(run.info.run_id).data.tags


def _pending_model_with_files(run_id: str, tmp_path: Path) -> str:
    """What a save killed before its manifest leaves behind: a PENDING model with some files."""
    client = MlflowClient()
    exp = client.get_run(run_id).info.experiment_id
    model = client.create_logged_model(
        exp,
        name="checkpoint-step-9",
        source_run_id=run_id,
        tags={"mlflow_ckpt.step": "9", "mlflow_ckpt.status": "pending"},
    )
    part = tmp_path / "tensors-00001-of-00001.safetensors"
    part.write_bytes(b"\x00" * 100)
    client.log_model_artifact(model.model_id, str(part))
    return model.model_id


def test_uncommitted_checkpoint_is_invisible(tracking: str, tmp_path: Path) -> None:
    run_id, _ = saved_run(steps=(0, 4))
    model_id = _pending_model_with_files(run_id, tmp_path)
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run_id)] == [4, 0]
    assert mlflow_ckpt.latest_checkpoint(run_id).step == 4
    with pytest.raises(mlflow_ckpt.CheckpointNotFoundError, match="never finished"):
        mlflow_ckpt.load(f"models:/{model_id}", {"model": net()})
    mgr = mlflow_ckpt.CheckpointManager.resume(run_id, {"model": net()})
    assert mgr.start_step == 5 and mgr.resumed_from.step == 4
    mgr.close()


def test_missing_manifest_means_not_committed(tracking: str) -> None:
    run_id, _ = saved_run()
    ckpt = mlflow_ckpt.latest_checkpoint(run_id)
    (Path(ckpt.artifact_location) / "manifest.json").unlink()
    with pytest.raises(mlflow_ckpt.CheckpointNotFoundError, match=r"no manifest\.json"):
        mlflow_ckpt.load(ckpt, {"model": net()})


def test_newer_format_version_and_unsafe_paths_are_refused(tracking: str) -> None:
    run_id, _ = saved_run()
    ckpt = mlflow_ckpt.latest_checkpoint(run_id)
    path = Path(ckpt.artifact_location) / "manifest.json"
    original = json.loads(path.read_text())

    def write(manifest: dict) -> None:  # as its writer would: the catalog records the digest
        data = json.dumps(manifest).encode()
        path.write_bytes(data)
        MlflowClient().set_logged_model_tags(
            ckpt.model_id, {"mlflow_ckpt.manifest_sha256": hashlib.sha256(data).hexdigest()}
        )

    write(dict(original, format_version=99))
    with pytest.raises(mlflow_ckpt.CheckpointError, match="upgrade mlflow_ckpt"):
        mlflow_ckpt.load(ckpt, {"model": net()})
    evil = dict(original)
    evil["files"] = [
        dict(f, path="../../../etc/passwd") if f["path"] == "MLmodel" else f
        for f in original["files"]
    ]
    write(evil)
    with pytest.raises(mlflow_ckpt.CheckpointCorruptedError, match="not a plain relative path"):
        mlflow_ckpt.load(ckpt, {"model": net()})


def test_resume_without_checkpoints_starts_at_zero(tracking: str) -> None:
    with mlflow.start_run(run_name="empty") as run:
        pass
    mgr = mlflow_ckpt.CheckpointManager.resume(run.info.run_id, {"model": net()})
    assert mgr.start_step == 0 and mgr.resumed_from is None
    assert mlflow.active_run().info.run_id == run.info.run_id
    mgr.close()


def test_resume_while_another_run_is_active(tracking: str) -> None:
    run_id, _ = saved_run()
    with (
        mlflow.start_run(run_name="other"),
        pytest.raises(mlflow_ckpt.CheckpointError, match="active"),
    ):
        mlflow_ckpt.CheckpointManager.resume(run_id, {"model": net()})


def test_bad_arguments(tracking: str) -> None:
    with mlflow.start_run(run_name="args"):
        with pytest.raises(ValueError, match="format"):
            mlflow_ckpt.CheckpointManager({"model": net()}, format="pickle")
        with pytest.raises(ValueError, match="mode"):
            mlflow_ckpt.CheckpointManager({"model": net()}, monitor="x", mode="lowest")
        with pytest.raises(ValueError, match="positive"):
            mlflow_ckpt.CheckpointManager({"model": net()}, save_every_n_steps=0)
        with pytest.raises(ValueError, match="importable"):
            mlflow_ckpt.CheckpointManager({"model": net()}, model_factory=lambda: net())
        with pytest.raises(ValueError, match="JSON"):
            mlflow_ckpt.CheckpointManager({"model": net()}, model_kwargs={"x": object()})
        with pytest.raises(TypeError, match="non-empty dict"):
            mlflow_ckpt.CheckpointManager({})


def test_an_mlflow_before_3_is_refused_by_name_and_the_bound_is_pyprojects() -> None:
    from mlflow_ckpt._version import OLDEST_MLFLOW, require_mlflow

    with pytest.raises(mlflow_ckpt.errors.MlflowVersionError, match=r"MLflow 2\.22\.1") as info:
        require_mlflow("2.22.1")
    assert isinstance(info.value, ImportError) and OLDEST_MLFLOW in str(info.value)
    require_mlflow(OLDEST_MLFLOW)
    require_mlflow(mlflow.__version__)
    # the message names the lower bound that pyproject.toml declares (and .ci/compat runs)
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert f'"mlflow>={OLDEST_MLFLOW},' in pyproject

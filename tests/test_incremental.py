"""Incremental checkpoints: what each save adds to the store, shared bytes that survive
retention and ``mlflow gc``, loading everywhere, promotion that outlives the run."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

import mlflow_ckpt
from mlflow_ckpt.catalog import tags
from mlflow_ckpt.catalog.shared import shared_area_uri
from mlflow_ckpt.cli import main as cli
from mlflow_ckpt.codec import Manifest
from mlflow_ckpt.errors import CheckpointCorruptedError
from mlflow_ckpt.folder import incremental
from mlflow_ckpt.storage import local_path_of, open_store
from tests.conftest import StoreUnderTest

MB = 1024 * 1024


class FrozenNet(torch.nn.Module):
    """A fine-tune: a frozen backbone (~94% of the checkpoint's bytes) and a small head."""

    def __init__(self, width: int = 1024) -> None:
        super().__init__()
        self.backbone = torch.nn.Sequential(
            torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, width)
        )
        self.head = torch.nn.Linear(width, 64)
        self.backbone.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def fine_tune(seed: int = 0) -> dict[str, object]:
    torch.manual_seed(seed)
    model = FrozenNet()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return {"model": model, "optimizer": opt}


def train_step(state: dict[str, object]) -> None:
    model, opt = state["model"], state["optimizer"]
    assert isinstance(model, FrozenNet) and isinstance(opt, torch.optim.Optimizer)
    loss = model(torch.randn(8, 1024)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def fine_tune_run(run_name: str, steps: int = 3, **manager_kwargs: object) -> tuple[str, FrozenNet]:
    """Train the fine-tune ``steps`` steps in a new run, saving each (sync); return the run
    ID and the trained model."""
    state = fine_tune()
    model = state["model"]
    assert isinstance(model, FrozenNet)
    with mlflow.start_run(run_name=run_name) as run:
        with mlflow_ckpt.CheckpointManager(
            state,
            save_every_n_steps=1,
            model_factory="tests.test_incremental:FrozenNet",
            async_save=False,
            timeline=False,
            **manager_kwargs,  # type: ignore[arg-type]
        ) as mgr:
            for step in range(steps):
                train_step(state)
                mgr.step(step)
    return run.info.run_id, model


def copy_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def stored_bytes_in_store(ckpt: mlflow_ckpt.Checkpoint) -> int:
    """What a checkpoint added, read from the store's own listing: its folder (manifest
    excluded) plus the shared group it wrote, if any."""
    own = open_store(ckpt.artifact_location).list_sizes("")
    added = sum(size for name, size in own.items() if name != "manifest.json")
    shared = open_store(shared_area_uri(run_artifact_uri(ckpt.run_id)))
    return added + sum(shared.list_sizes(ckpt.model_id).values())


def run_artifact_uri(run_id: str) -> str:
    return MlflowClient().get_run(run_id).info.artifact_uri


def shared_groups_on_disk(run_id: str) -> set[str]:
    return set(open_store(shared_area_uri(run_artifact_uri(run_id))).list_folders())


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_later_checkpoints_store_only_what_changed_and_all_load_exactly(
    tracking: str, async_save: bool
) -> None:
    state = fine_tune()
    model = state["model"]
    assert isinstance(model, FrozenNet)
    saved = {}
    with mlflow.start_run(run_name="fine-tune") as run:
        with mlflow_ckpt.CheckpointManager(
            state, save_every_n_steps=1, async_save=async_save, timeline=False
        ) as mgr:
            for step in range(4):
                train_step(state)
                mgr.step(step)
                saved[step] = copy_of(model)
    ckpts = sorted(mlflow_ckpt.list_checkpoints(run.info.run_id), key=lambda c: c.step)
    first = ckpts[0]
    assert stored_bytes_in_store(first) == first.stored_bytes >= first.size_bytes
    for ckpt in ckpts[1:]:
        assert ckpt.size_bytes == first.size_bytes  # the logical size is the whole state
        assert stored_bytes_in_store(ckpt) == ckpt.stored_bytes
        assert ckpt.stored_bytes <= 0.12 * first.stored_bytes, (ckpt.step, ckpt.stored_bytes)
        assert ckpt.shared == (first.model_id,)  # the backbone, written once
    for ckpt in ckpts:  # every one restores its own step exactly
        fresh = fine_tune(seed=1)["model"]
        mlflow_ckpt.load(ckpt, {"model": fresh})
        got = fresh.state_dict()  # type: ignore[union-attr]
        assert all(torch.equal(got[k], v) for k, v in saved[ckpt.step].items()), ckpt.step
    out = CliRunner().invoke(cli, ["verify", run.info.run_id])
    assert out.exit_code == 0, out.output


def test_frozen_parameters_are_neither_copied_nor_hashed_until_they_change(
    tracking: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[str] = []
    real = incremental.hash_tensor

    def counting(tensor: torch.Tensor) -> str:
        hashed.append(f"{tuple(tensor.shape)}")
        return real(tensor)

    monkeypatch.setattr(incremental, "hash_tensor", counting)
    state = fine_tune()
    model = state["model"]
    assert isinstance(model, FrozenNet)
    backbone_shapes = {f"{tuple(p.shape)}" for p in model.backbone.parameters()}
    with mlflow.start_run(run_name="frozen") as run:
        with mlflow_ckpt.CheckpointManager(state, async_save=True, timeline=False) as mgr:
            train_step(state)
            mgr.save(0)
            mgr.wait()
            first = list(hashed)
            hashed.clear()
            for step in (1, 2):
                train_step(state)
                mgr.save(step)
                mgr.wait()
            unchanged = list(hashed)
            hashed.clear()
            with torch.no_grad():
                model.backbone[0].bias.add_(1.0)  # an in-place edit moves the version counter
            mgr.save(3)
            mgr.wait()
            edited = list(hashed)
    # the first save hashes the frozen tensors it puts in the shared area (for resumes)
    assert backbone_shapes <= set(first)
    assert not backbone_shapes & set(unchanged)  # later saves do not even read them
    assert "(1024,)" in edited  # the edited bias is compared and written again
    ckpts = {c.step: c for c in mlflow_ckpt.list_checkpoints(run.info.run_id)}
    assert ckpts[3].stored_bytes > ckpts[2].stored_bytes  # the bias, in a new group
    assert len(ckpts[3].shared) == 2
    restored = fine_tune(seed=3)["model"]
    mlflow_ckpt.load(ckpts[3], {"model": restored})
    assert torch.equal(restored.backbone[0].bias, model.backbone[0].bias)  # type: ignore[index]


@pytest.mark.parametrize(
    ("async_save", "compression"),
    [(False, None), (True, None), (False, "zstd")],
    ids=["sync", "async", "zstd"],
)
def test_the_first_save_after_a_resume_reads_no_frozen_parameter(
    tracking: str, monkeypatch: pytest.MonkeyPatch, async_save: bool, compression: str | None
) -> None:
    """The restore leaves the checkpoint's bytes in the frozen backbone: the next save
    references them unread, as after a save of its own; an edit in between is still seen.
    Compressed, the backbone is interleaved straight into the live parameters
    (``PlanarTensor``), and compared with the checkpoint plane by plane."""
    run_id, _ = fine_tune_run("before resume", steps=2, compression=compression)
    hashed: list[str] = []
    real = incremental.hash_tensor
    monkeypatch.setattr(
        incremental, "hash_tensor", lambda t: hashed.append(f"{tuple(t.shape)}") or real(t)
    )
    state = fine_tune(seed=5)
    model = state["model"]
    assert isinstance(model, FrozenNet)
    backbone_shapes = {f"{tuple(p.shape)}" for p in model.backbone.parameters()}
    with mlflow_ckpt.CheckpointManager.resume(
        run_id, state, async_save=async_save, timeline=False, compression=compression
    ) as mgr:
        train_step(state)
        mgr.save(2)
        mgr.wait()
        after_resume = list(hashed)
        with torch.no_grad():
            model.backbone[2].bias.mul_(2.0)  # type: ignore[index]
        train_step(state)
        mgr.save(3)
    assert not backbone_shapes & set(after_resume), after_resume  # not read at all
    ckpts = {c.step: c for c in mlflow_ckpt.list_checkpoints(run_id)}
    assert ckpts[2].shared == ckpts[1].shared  # the backbone, referenced where it lies
    assert ckpts[2].stored_bytes < 0.12 * ckpts[0].stored_bytes
    assert "(1024,)" in hashed[len(after_resume) :]  # the edited bias is compared again
    restored = fine_tune(seed=7)["model"]
    assert isinstance(restored, FrozenNet)
    mlflow_ckpt.load(ckpts[3], {"model": restored})
    for name, tensor in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name
    mlflow_ckpt.load(ckpts[2], {"model": restored})  # before the edit
    edited = model.backbone[2].bias  # type: ignore[index]
    assert torch.equal(restored.backbone[2].bias * 2.0, edited)  # type: ignore[index]
    assert torch.equal(restored.backbone[0].weight, model.backbone[0].weight)  # type: ignore[index]


class KeepsItsBackbone(FrozenNet):
    """Loads its head only: the backbone keeps the weights it was built with."""

    def load_state_dict(self, state_dict, strict=True, assign=False):  # type: ignore[no-untyped-def]
        head = {k: v for k, v in state_dict.items() if k.startswith("head.")}
        return super().load_state_dict(head, strict=False, assign=assign)


class ConvertsOnLoad(FrozenNet):
    """Its loading converts what it is given (a format upgrade, a rescaling): part of the
    frozen backbone then holds bytes that differ from the checkpoint's."""

    def load_state_dict(self, state_dict, strict=True, assign=False):  # type: ignore[no-untyped-def]
        converted = {
            k: v * 2.0 if k.startswith("backbone.0.") else v for k, v in state_dict.items()
        }
        return super().load_state_dict(converted, strict=strict, assign=assign)


@pytest.mark.parametrize("model_class", [KeepsItsBackbone, ConvertsOnLoad])
def test_a_frozen_parameter_the_restore_did_not_fill_with_the_saved_bytes_is_stored_as_it_is(
    tracking: str, model_class: type[FrozenNet]
) -> None:
    """Only frozen parameters that hold the checkpoint's bytes after the restore are
    referenced unread by the next save. A backbone its module declined to load, or
    converted on the way in, is compared and stored: referencing it under the same names
    would make the next checkpoint keep the old bytes for the live ones."""
    run_id, _ = fine_tune_run("before resume", steps=2)
    torch.manual_seed(5)
    model = model_class()
    state = {
        "model": model,
        "optimizer": torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]),
    }
    with mlflow_ckpt.CheckpointManager.resume(
        run_id, state, async_save=False, timeline=False
    ) as mgr:
        train_step(state)
        mgr.save(2)
    ckpt = mlflow_ckpt.latest_checkpoint(run_id)
    assert ckpt is not None and ckpt.step == 2
    restored = fine_tune(seed=7)["model"]
    mlflow_ckpt.load(ckpt, {"model": restored})
    for name, tensor in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name


def test_frozen_bytes_are_compared_bit_for_bit() -> None:
    """The check behind the previous tests: equal values are not enough (a conversion
    that turns -0.0 into 0.0 changes the bytes), and NaNs equal themselves."""
    from mlflow_ckpt.snapshot.changes import same_bytes

    weight = torch.tensor([[1.0, -0.0], [float("nan"), 2.0]])
    assert same_bytes(weight.t(), weight.t().contiguous())  # strided live tensor
    assert not same_bytes(weight, weight.abs())  # -0.0 vs 0.0: equal values, other bytes
    assert not same_bytes(weight, weight.double())
    assert not same_bytes(weight, weight.reshape(4))
    assert not same_bytes(weight, None)  # not in the checkpoint
    row = torch.randn(9)[1:]  # 4 bytes into its storage: compared in words both divide
    assert same_bytes(row, row.clone()) and same_bytes(row.clone(), row)
    assert not same_bytes(row, row.clone().index_fill_(0, torch.tensor([7]), 0.5))


def test_unchanged_tensors_are_found_by_content_also_after_a_resume(tracking: str) -> None:
    table = torch.randn(2 * MB)  # 8 MiB, never changes, not a module parameter
    state = {"table": table, "w": torch.zeros(100)}
    with mlflow.start_run(run_name="content") as run:
        with mlflow_ckpt.CheckpointManager(state, async_save=False, timeline=False) as mgr:
            for step in range(3):
                state["w"].add_(1.0)
                mgr.save(step)
    run_id = run.info.run_id
    added = [
        c.stored_bytes for c in sorted(mlflow_ckpt.list_checkpoints(run_id), key=lambda c: c.step)
    ]
    # 1st: all in its folder; 2nd: the unchanged table moves to the shared area once;
    # 3rd: it is referenced there by its hash
    assert added[0] > 8 * MB and added[1] > 8 * MB and added[2] < 64 * 1024, added
    resumed_state = {"table": torch.zeros(2 * MB), "w": torch.zeros(100)}
    with mlflow_ckpt.CheckpointManager.resume(
        run_id, resumed_state, async_save=False, timeline=False
    ) as mgr:
        assert torch.equal(resumed_state["table"], table)
        resumed_state["w"].add_(1.0)
        mgr.save(3)
    after = mlflow_ckpt.latest_checkpoint(run_id)
    assert after is not None and after.step == 3
    assert after.stored_bytes < 64 * 1024  # compared by hash with the resumed checkpoint
    assert after.shared == mlflow_ckpt.list_checkpoints(run_id)[1].shared


def test_retention_and_mlflow_gc_never_lose_a_referenced_byte(tracking: str, run_child) -> None:
    state = fine_tune()
    model = state["model"]
    assert isinstance(model, FrozenNet)
    with mlflow.start_run(run_name="retention") as run:
        with mlflow_ckpt.CheckpointManager(
            state, save_every_n_steps=1, keep_last_n=2, async_save=True, timeline=False
        ) as mgr:
            for step in range(7):
                train_step(state)
                if step == 3:
                    with torch.no_grad():
                        model.backbone[2].weight.mul_(0.5)  # a new group from here on
                mgr.step(step)
                if step == 2:
                    mgr.wait()
                    # steps 1 and 2 are kept; the deleted step 0 wrote the group they use
                    groups = shared_groups_on_disk(run.info.run_id)
                    assert len(groups) == 1 and mgr.last_checkpoint is not None
                    assert groups == set(mgr.last_checkpoint.shared)
            expected = copy_of(model)
    run_id = run.info.run_id
    kept = mlflow_ckpt.list_checkpoints(run_id)
    assert [c.step for c in kept] == [6, 5]
    referenced = {g for c in kept for g in c.shared}
    # the first group is gone (nothing kept needs it), the one written at step 3 stays
    assert shared_groups_on_disk(run_id) == referenced and len(referenced) == 2
    client = MlflowClient()
    visible = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    assert len(visible) == 2  # MLflow's soft delete hides the others from searches
    # MLflow's own collector purges the deleted LoggedModels' artifacts: nothing kept needs them
    run_child("mlflow", "gc", "--backend-store-uri", tracking)
    assert shared_groups_on_disk(run_id) == referenced
    assert CliRunner().invoke(cli, ["verify", run_id]).exit_code == 0
    restored = fine_tune(seed=9)["model"]
    mlflow_ckpt.load(kept[0], {"model": restored})
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in expected.items())  # type: ignore[union-attr]


def test_milestones_are_self_contained_so_a_damaged_shared_file_leaves_one_to_resume(
    tracking: str,
) -> None:
    state = fine_tune()
    model = state["model"]
    assert isinstance(model, FrozenNet)
    saved = {}
    with mlflow.start_run(run_name="milestones") as run:
        with mlflow_ckpt.CheckpointManager(
            state,
            save_every_n_steps=1,
            keep_last_n=2,
            keep_every_n_steps=3,  # milestones: steps 2 and 5
            async_save=True,  # the milestone's snapshot copies the frozen tensors too
            timeline=False,
        ) as mgr:
            for step in range(7):
                train_step(state)
                mgr.step(step)
                saved[step] = copy_of(model)
    run_id = run.info.run_id
    kept = {c.step: c for c in mlflow_ckpt.list_checkpoints(run_id)}
    assert sorted(kept) == [2, 5, 6]
    for milestone in (kept[2], kept[5]):  # written whole, referencing no shared file
        assert milestone.shared == () and milestone.stored_bytes >= milestone.size_bytes
        assert stored_bytes_in_store(milestone) == milestone.stored_bytes
    # the save after a milestone starts a new group; the groups of steps 0 and 3 are gone
    assert kept[6].shared == (kept[6].model_id,)
    assert shared_groups_on_disk(run_id) == {kept[6].model_id}
    assert kept[6].stored_bytes > 0.9 * kept[5].stored_bytes  # the backbone, once more
    # one flipped byte in the backbone's shared file: only step 6 references it
    area = local_path_of(shared_area_uri(run_artifact_uri(run_id)))
    assert area is not None
    (damaged,) = [p for p in (area / kept[6].model_id).rglob("*") if p.is_file()]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    out = CliRunner().invoke(cli, ["verify", run_id])
    assert out.exit_code == 1 and damaged.name in out.output, out.output
    resumed = fine_tune(seed=3)
    with pytest.warns(UserWarning, match=f"Skipping checkpoint {kept[6].uri}"):
        with mlflow_ckpt.CheckpointManager.resume(
            run_id, resumed, async_save=False, timeline=False
        ) as mgr:
            assert mgr.resumed_from is not None and mgr.resumed_from.step == 5
            assert mgr.start_step == 6
            got = resumed["model"].state_dict()  # type: ignore[union-attr]
            assert all(torch.equal(got[k], v) for k, v in saved[5].items())
            train_step(resumed)
            mgr.save(6)  # from the milestone: a new group again, not the damaged one
    newest = mlflow_ckpt.latest_checkpoint(run_id)
    assert newest is not None and newest.step == 6 and newest.model_id != kept[6].model_id
    assert newest.shared == (newest.model_id,)
    fresh = fine_tune(seed=4)["model"]
    mlflow_ckpt.load(newest, {"model": fresh})


def test_milestones_so_close_that_every_save_is_whole_are_warned_about_once(
    tracking: str,
) -> None:
    """Milestones at steps 1, 3, 5 with one save between: every save is written whole."""
    with pytest.warns(UserWarning, match="steps 1 and 3 are both milestones") as caught:
        run_id, _ = fine_tune_run("close milestones", steps=6, keep_every_n_steps=2)
    assert [str(w.message) for w in caught].count(str(caught[0].message)) == 1
    assert sum("both milestones" in str(w.message) for w in caught) == 1  # not again at 5
    assert all(c.shared == () for c in mlflow_ckpt.list_checkpoints(run_id))  # (as it said)
    # two saves between milestones (steps 2 and 5): the save between them reuses bytes
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        run_id, _ = fine_tune_run("spaced", steps=6, keep_every_n_steps=3, keep_last_n=6)
    assert not [w for w in seen if "milestones" in str(w.message)]
    by_step = {c.step: c for c in mlflow_ckpt.list_checkpoints(run_id)}
    assert by_step[4].stored_bytes < 0.2 * by_step[4].size_bytes


def test_pyfunc_and_mlflow_models_predict_after_predecessors_are_collected(
    tracking: str, run_child, tmp_path: Path
) -> None:
    run_id, model = fine_tune_run("serve", keep_last_n=1)
    run_child("mlflow", "gc", "--backend-store-uri", tracking)
    (ckpt,) = mlflow_ckpt.list_checkpoints(run_id)
    assert ckpt.shared and ckpt.shared[0] != ckpt.model_id  # its backbone: step 0's group
    batch = np.random.default_rng(0).standard_normal((2, 1024)).astype(np.float32)
    expected = model.eval()(torch.from_numpy(batch)).detach().numpy()
    served = mlflow.pyfunc.load_model(ckpt.uri).predict(batch)
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)
    request = tmp_path / "input.json"
    request.write_text(json.dumps({"inputs": batch.tolist()}))
    out = tmp_path / "out.json"
    run_child(
        "mlflow", "models", "predict", "-m", ckpt.uri, "-i", str(request), "-t", "json",
        "-o", str(out), "--env-manager", "local",
    )  # fmt: skip
    predicted = np.asarray(json.loads(out.read_text())["predictions"], dtype=np.float32)
    np.testing.assert_allclose(predicted, expected, rtol=1e-5, atol=1e-6)


def test_a_promoted_checkpoint_outlives_its_deleted_and_collected_run(
    tracking: str, run_child
) -> None:
    run_id, model = fine_tune_run("promote")
    latest = mlflow_ckpt.latest_checkpoint(run_id)
    assert latest is not None and latest.shared
    mlflow_ckpt.promote(latest, "fine-tuned", alias="champion")
    client = MlflowClient()
    promoted = client.get_logged_model(latest.model_id)
    assert tags.SHARED not in promoted.tags and tags.MANIFEST_SHA256_NEXT not in promoted.tags
    manifest = Manifest.from_json(
        (Path(latest.artifact_location) / "manifest.json").read_text(), "test"
    )
    assert manifest.shared_uri is None and not manifest.shared_groups
    area = local_path_of(shared_area_uri(run_artifact_uri(run_id)))
    for other in mlflow_ckpt.list_checkpoints(run_id)[1:]:
        client.delete_logged_model(other.model_id)
    client.delete_run(run_id)
    run_child("mlflow", "gc", "--backend-store-uri", tracking)
    assert area is not None and not area.exists()  # the run's artifacts are gone
    batch = np.ones((2, 1024), dtype=np.float32)
    expected = model.eval()(torch.from_numpy(batch)).detach().numpy()
    served = mlflow.pyfunc.load_model("models:/fine-tuned@champion").predict(batch)
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)


def test_incremental_with_compression_and_incremental_off(tracking: str) -> None:
    results = {}
    for label, kwargs in {
        "zstd": {"compression": "zstd"},
        "whole": {"incremental": False},
    }.items():
        state = fine_tune()
        with mlflow.start_run(run_name=label) as run:
            with mlflow_ckpt.CheckpointManager(
                state, async_save=True, timeline=False, **kwargs
            ) as mgr:
                for step in range(2):
                    train_step(state)
                    mgr.save(step)
        ckpts = sorted(mlflow_ckpt.list_checkpoints(run.info.run_id), key=lambda c: c.step)
        restored = fine_tune(seed=4)["model"]
        mlflow_ckpt.load(ckpts[-1], {"model": restored})
        live = state["model"].state_dict()  # type: ignore[union-attr]
        assert all(torch.equal(restored.state_dict()[k], v) for k, v in live.items())  # type: ignore[union-attr]
        results[label] = ckpts
    zstd, whole = results["zstd"], results["whole"]
    assert (
        zstd[1].shared == (zstd[0].model_id,) and zstd[1].stored_bytes < 0.12 * zstd[0].size_bytes
    )
    shared_files = open_store(shared_area_uri(run_artifact_uri(zstd[0].run_id))).list_sizes(
        zstd[0].model_id
    )
    assert shared_files and all(name.endswith(".ztensors") for name in shared_files)
    assert not whole[1].shared and whole[1].stored_bytes == whole[0].stored_bytes
    with pytest.raises(TypeError, match="incremental must be True or False"):
        mlflow_ckpt.CheckpointManager({"w": torch.zeros(2)}, incremental="yes")


def test_incremental_checkpoints_on_every_store(store: StoreUnderTest) -> None:
    state = fine_tune()
    with mlflow.start_run(run_name=f"inc-{store.name}") as run:
        with mlflow_ckpt.CheckpointManager(
            state, save_every_n_steps=1, keep_last_n=1, async_save=True, timeline=False
        ) as mgr:
            for step in range(3):
                train_step(state)
                mgr.step(step)
    run_id = run.info.run_id
    (kept,) = mlflow_ckpt.list_checkpoints(run_id)
    first_group = kept.shared[0]
    assert first_group != kept.model_id  # written by the deleted first checkpoint
    keys = store.list_keys()
    assert any(f"mlflow_ckpt/shared/{first_group}/" in k for k in keys), keys[:20]
    assert kept.stored_bytes < 0.12 * kept.size_bytes
    restored = fine_tune(seed=5)["model"]
    mlflow_ckpt.load(kept, {"model": restored})
    live = state["model"].state_dict()  # type: ignore[union-attr]
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in live.items())  # type: ignore[union-attr]


@pytest.mark.parametrize(
    # "@x": no name we write starts with "@", so none may (it could pose as another prefix)
    "path",
    ["@shared/../x", "@shared/@shared/x", "@shared/", "x/@shared/y/../z", "@x"],
)
def test_a_forged_shared_path_is_refused(path: str) -> None:
    entry = {"path": path, "size": 1, "blake3": "0" * 64}
    data = {
        "format": "safetensors",
        "step": 0,
        "epoch": None,
        "metrics": {},
        "created_at": 0.0,
        "files": [entry, {"path": "state.json", "size": 1, "blake3": "0" * 64}],
        "tensors": [],
        "structure_file": "state.json",
        "format_version": 5,
        "shared_uri": "/tmp/elsewhere",
    }
    with pytest.raises(CheckpointCorruptedError, match="not a plain relative path"):
        Manifest.from_json(json.dumps(data), "forged")


def test_shared_files_without_a_shared_area_are_refused() -> None:
    data = {
        "format": "safetensors",
        "step": 0,
        "epoch": None,
        "metrics": {},
        "created_at": 0.0,
        "files": [{"path": "@shared/m-1/t.safetensors", "size": 1, "blake3": "0" * 64}],
        "tensors": [],
        "structure_file": "@shared/m-1/t.safetensors",
        "format_version": 5,
    }
    with pytest.raises(CheckpointCorruptedError, match="no shared_uri"):
        Manifest.from_json(json.dumps(data), "forged")


def test_gc_sweeps_groups_of_saves_that_never_committed(tracking: str) -> None:
    state = fine_tune()
    with mlflow.start_run(run_name="orphans") as run:
        with mlflow_ckpt.CheckpointManager(state, async_save=False, timeline=False) as mgr:
            train_step(state)
            mgr.save(0)
    run_id = run.info.run_id
    area = local_path_of(shared_area_uri(run.info.artifact_uri))
    assert area is not None
    orphan = area / "m-0000000000000000000000000000dead"  # what a killed save leaves
    orphan.mkdir()
    (orphan / "tensors-00001-of-00001.safetensors").write_bytes(b"x" * 100)
    dry = CliRunner().invoke(cli, ["gc", run_id, "--dry-run"])
    assert "would delete 1 group(s)" in dry.output and orphan.exists(), dry.output
    result = CliRunner().invoke(cli, ["gc", run_id])
    assert result.exit_code == 0 and "deleted 1 group(s)" in result.output, result.output
    assert not orphan.exists()
    (ckpt,) = mlflow_ckpt.list_checkpoints(run_id)
    assert shared_groups_on_disk(run_id) == set(ckpt.shared)
    assert os.environ.get("MLFLOW_TRACKING_URI") == tracking

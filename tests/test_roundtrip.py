"""Every kind of state round-trips through both formats, and the manifest says what it holds."""

from __future__ import annotations

import collections
import hashlib
import json
import random
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

import mlflow_ckpt
from mlflow_ckpt.codec import Manifest
from mlflow_ckpt.codec.hashing import hash_bytes

FORMATS = ["safetensors", "torch"]


class Sampler:
    """A user's data position: not a torch object, just the Stateful protocol."""

    def __init__(self, seed: int) -> None:
        self.seed, self.index, self.order = seed, 0, list(range(10))

    def state_dict(self) -> dict:
        return {"seed": self.seed, "index": self.index, "order": self.order}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.index, self.order = state["seed"], state["index"], list(state["order"])


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(11, 6)
        self.norm = torch.nn.BatchNorm1d(6)
        self.out = torch.nn.Linear(6, 11, bias=False)
        self.out.weight = self.emb.weight  # tied: stored once, restored to both

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.emb(x)))


def make_state(seed: int) -> dict:
    torch.manual_seed(seed)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=50)
    cosine_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.5, momentum=0.9)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(cosine_opt, T_max=7)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**seed)
    for _ in range(3 + seed):
        loss = model(torch.randint(0, 11, (4,))).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        cosine_opt.step()
        cosine.step()
    sampler = Sampler(seed)
    sampler.index = 3 + seed
    base = torch.arange(12.0).reshape(3, 4) + seed
    return {
        "model": model,
        "optimizer": opt,
        "scheduler": sched,
        "cosine_opt": cosine_opt,
        "cosine": cosine,
        "scaler": scaler,
        "sampler": sampler,
        "data_gen": torch.Generator().manual_seed(100 + seed),
        "py_rng": random.Random(seed),
        "np_rng": np.random.default_rng(seed),
        "np_legacy": np.random.RandomState(seed),
        "weights": torch.full((5,), float(seed)),
        "extra": {
            "bf16": torch.ones(2, 2, dtype=torch.bfloat16) * (seed + 1),
            "scalar": torch.tensor(seed + 0.5),
            "empty": torch.empty(0, 3),
            "strided": base.t(),  # non-contiguous
            "ints": {0: seed, 1: [seed, seed + 1]},
            "tuple": (seed, "x", None),
            "nan": float("nan") if seed else 1.0,
            "bytes": bytes([seed, 1, 2]),
            "array": np.arange(4, dtype=np.int16) + seed,
            "npf": np.float32(seed + 0.25),
            "list": [torch.zeros(2) + seed, {"deep": torch.ones(1) * seed}],
        },
        "counter": seed * 10,
        "name": f"run-{seed}",
    }


def assert_same_state(a: dict, b: dict) -> None:
    for key in a["model"].state_dict():
        assert torch.equal(a["model"].state_dict()[key], b["model"].state_dict()[key]), key
    assert b["model"].out.weight is b["model"].emb.weight
    assert str(a["optimizer"].state_dict()) == str(b["optimizer"].state_dict())
    for name in ("scheduler", "cosine", "scaler", "sampler", "cosine_opt"):
        assert str(a[name].state_dict()) == str(b[name].state_dict()), name
    assert torch.equal(a["data_gen"].get_state(), b["data_gen"].get_state())
    assert a["py_rng"].getstate() == b["py_rng"].getstate()
    assert a["np_rng"].bit_generator.state == b["np_rng"].bit_generator.state
    assert a["np_rng"].random() == b["np_rng"].random()
    assert a["np_legacy"].randint(1000) == b["np_legacy"].randint(1000)
    assert torch.equal(a["weights"], b["weights"])
    ea, eb = a["extra"], b["extra"]
    for key in ("bf16", "scalar", "empty", "strided"):
        assert ea[key].dtype == eb[key].dtype and torch.equal(ea[key], eb[key]), key
    assert ea["ints"] == eb["ints"] and ea["tuple"] == eb["tuple"] and ea["bytes"] == eb["bytes"]
    assert np.array_equal(ea["array"], eb["array"]) and ea["array"].dtype == eb["array"].dtype
    assert type(eb["npf"]) is np.float32 and ea["npf"] == eb["npf"]
    assert (np.isnan(ea["nan"]) and np.isnan(eb["nan"])) or ea["nan"] == eb["nan"]
    assert torch.equal(ea["list"][0], eb["list"][0])
    assert torch.equal(ea["list"][1]["deep"], eb["list"][1]["deep"])
    assert a["counter"] == b["counter"] and a["name"] == b["name"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("async_save", [True, False])
def test_every_state_kind_round_trips(tracking: str, fmt: str, async_save: bool) -> None:
    saved = make_state(1)
    with mlflow.start_run(run_name="rt"):
        with mlflow_ckpt.CheckpointManager(saved, format=fmt, async_save=async_save) as mgr:
            mgr.save(7, {"val_loss": 0.5}, epoch=2)
        ckpt = mlflow_ckpt.latest_checkpoint(mgr.run_id)
    assert (ckpt.step, ckpt.epoch, ckpt.format, ckpt.metrics) == (7, 2, fmt, {"val_loss": 0.5})
    assert ckpt.triggers == ("manual",)
    target = make_state(2)
    assert target["extra"]["strided"].is_contiguous() is False
    returned = mlflow_ckpt.load(ckpt.uri, target, strict=True)
    assert returned == ckpt
    assert_same_state(saved, target)


def test_load_subset_and_training_state_without_objects(tracking: str) -> None:
    saved = make_state(1)
    with mlflow.start_run(run_name="rt"):
        with mlflow_ckpt.CheckpointManager(saved, async_save=False) as mgr:
            mgr.save(3)
    uri = mlflow_ckpt.latest_checkpoint(mgr.run_id).uri
    model = Tied()
    mlflow_ckpt.load(uri, {"model": model}, restore_rng=False)
    assert torch.equal(model.emb.weight, saved["model"].emb.weight)

    raw = mlflow_ckpt.load_training_state(uri)
    assert set(raw) >= {"model", "optimizer", "sampler", "_rng", "_progress"}
    assert raw["_progress"]["step"] == 3
    assert raw["sampler"] == saved["sampler"].state_dict()
    assert torch.equal(raw["model"]["emb.weight"], saved["model"].emb.weight)
    assert isinstance(raw["model"], collections.OrderedDict)


@pytest.mark.parametrize("fmt", FORMATS)
def test_manifest_lists_every_file_hash_and_tensor(tracking: str, fmt: str) -> None:
    state = {"model": torch.nn.Linear(300, 200), "big": torch.randn(100_000)}
    with mlflow.start_run(run_name="m"):
        with mlflow_ckpt.CheckpointManager(
            state, format=fmt, async_save=False, max_shard_bytes=300_000
        ) as mgr:
            mgr.save(11, {"val_loss": 1.5, "acc": 0.25}, epoch=1)
    ckpt = mlflow_ckpt.latest_checkpoint(mgr.run_id)
    folder = Path(ckpt.artifact_location)
    manifest = Manifest.from_json((folder / "manifest.json").read_text(), "test")
    on_disk = {p.name for p in folder.iterdir()} - {"manifest.json"}
    assert {f.path for f in manifest.files} == on_disk
    assert "MLmodel" in on_disk and "state.json" in on_disk
    shards = sorted(f for f in on_disk if f.startswith("tensors-"))
    assert len(shards) >= 2  # 400 KB + 240 KB with a 300 KB limit
    for entry in manifest.files:
        data = (folder / entry.path).read_bytes()
        assert len(data) == entry.size
        assert entry.algorithm == "blake3"
        assert hash_bytes(data, "blake3") == entry.digest
    names = {t.name for t in manifest.tensors}
    assert {"model/weight", "model/bias", "big"} <= names
    for t in manifest.tensors:
        assert t.file in shards
        if t.name == "big":
            assert t.shape == (100_000,) and t.dtype == "float32" and t.nbytes == 400_000
            if fmt == "safetensors":
                raw = (folder / t.file).read_bytes()[t.offset : t.offset + t.nbytes]
                assert raw == state["big"].numpy().tobytes()
            else:
                assert t.offset is None
    assert (manifest.step, manifest.epoch, manifest.format) == (11, 1, fmt)
    assert manifest.metrics == {"val_loss": 1.5, "acc": 0.25}
    assert manifest.triggers == ("manual",)
    assert set(manifest.versions) >= {"mlflow_ckpt", "torch", "mlflow", "safetensors"}
    assert manifest.size_bytes == ckpt.size_bytes == sum(f.size for f in manifest.files)
    # written last: nothing in the folder is newer than the manifest
    newest = max((folder / f).stat().st_mtime_ns for f in on_disk)
    assert (folder / "manifest.json").stat().st_mtime_ns >= newest
    structure = json.loads((folder / "state.json").read_text())
    assert structure["state"]["big"] == {"__tensor__": "big"}
    mlmodel = (folder / "MLmodel").read_text()
    assert "mlflow_ckpt:" in mlmodel and "python_function:" in mlmodel


def test_sha256_checkpoints_written_before_blake3_still_load_and_verify(tracking: str) -> None:
    """A format-1 folder (every file hashed with SHA-256) loads, verifies and is still
    checked: the algorithm is read per file from the manifest."""
    state = {"w": torch.randn(1000), "b": torch.arange(10)}
    with mlflow.start_run(run_name="old"):
        with mlflow_ckpt.CheckpointManager(state, async_save=False) as mgr:
            mgr.save(3)
    ckpt = mlflow_ckpt.latest_checkpoint(mgr.run_id)
    folder = Path(ckpt.artifact_location)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format_version"] == 3
    for entry in manifest["files"]:
        del entry["blake3"]
        entry["sha256"] = hashlib.sha256((folder / entry["path"]).read_bytes()).hexdigest()
    manifest["format_version"] = 1
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    (folder / "manifest.json").write_bytes(data)
    mlflow.MlflowClient().set_logged_model_tags(
        ckpt.model_id, {"mlflow_ckpt.manifest_sha256": hashlib.sha256(data).hexdigest()}
    )
    restored = {"w": torch.zeros(1000), "b": torch.zeros(10, dtype=torch.int64)}
    mlflow_ckpt.load(ckpt.uri, restored)
    assert torch.equal(restored["w"], state["w"]) and torch.equal(restored["b"], state["b"])
    shard = next(folder.glob("tensors-*"))
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(mlflow_ckpt.CheckpointCorruptedError, match=r"tensors-.*sha256"):
        mlflow_ckpt.load(ckpt.uri, restored)


def test_loaded_torch_files_hold_only_tensors(tracking: str) -> None:
    with mlflow.start_run(run_name="t"):
        with mlflow_ckpt.CheckpointManager(
            {"model": torch.nn.Linear(2, 2)}, format="torch", async_save=False
        ) as mgr:
            mgr.save(0)
    folder = Path(mlflow_ckpt.latest_checkpoint(mgr.run_id).artifact_location)
    (shard,) = folder.glob("*.pt")
    data = torch.load(shard, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in data.values())


def test_temporary_tensors_are_never_mistaken_for_shared_ones(tracking: str) -> None:
    """get_state() returns a fresh tensor each call; freed ones must not alias the next."""
    gens = {f"g{i}": torch.Generator().manual_seed(i) for i in range(6)}
    torch.manual_seed(99)
    with mlflow.start_run(run_name="gens"):
        with mlflow_ckpt.CheckpointManager(gens, async_save=False) as mgr:
            mgr.save(0)
    expected_torch = torch.get_rng_state()
    fresh = {f"g{i}": torch.Generator() for i in range(6)}
    torch.manual_seed(0)
    mlflow_ckpt.load(mlflow_ckpt.latest_checkpoint(mgr.run_id), fresh)
    for name, gen in gens.items():
        assert torch.equal(fresh[name].get_state(), gen.get_state()), name
    assert torch.equal(torch.get_rng_state(), expected_torch)
    raw = mlflow_ckpt.load_training_state(mlflow_ckpt.latest_checkpoint(mgr.run_id))
    assert torch.equal(raw["_rng"]["torch"], expected_torch)


class Shadow:
    """A user's object that keeps the tensor it is given (an EMA of the weights, say)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"shadow": self.tensor}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.tensor = state["shadow"]


class ShadowModel:
    """An EMA that keeps a module's state_dict as given: an ``OrderedDict`` with
    ``_metadata``, which must come back the same kind and own its tensors."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.weights = module.state_dict()

    def state_dict(self) -> dict[str, object]:
        return {"weights": self.weights}

    def load_state_dict(self, state: dict[str, collections.OrderedDict]) -> None:
        self.weights = state["weights"]


@pytest.mark.parametrize("compression", [None, "zstd"], ids=["plain", "zstd"])
def test_a_loaded_optimizer_owns_its_moments(tracking: str, compression: str | None) -> None:
    """An optimizer keeps the tensors it is given. Views into the (mapped) tensor file would
    keep the whole file alive and pay a copy-on-write fault per page at the first step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 4))  # 1 MB+
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 512)).sum().backward()
    opt.step()
    with mlflow.start_run(run_name="owned"):
        with mlflow_ckpt.CheckpointManager(
            {
                "model": model,
                "optimizer": opt,
                "ema": Shadow(torch.randn(512 * 512)),
                "ema_model": ShadowModel(model),
            },
            async_save=False,
            compression=compression,
        ) as mgr:
            mgr.save(0)
    fresh = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 4))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    ema, ema_model = Shadow(torch.zeros(1)), ShadowModel(torch.nn.Linear(1, 1))
    mlflow_ckpt.load(
        mlflow_ckpt.latest_checkpoint(mgr.run_id),
        {"model": fresh, "optimizer": fresh_opt, "ema": ema, "ema_model": ema_model},
    )
    assert ema.tensor.shape == (512 * 512,)
    assert ema.tensor.untyped_storage().nbytes() == ema.tensor.numel() * 4
    assert type(ema_model.weights) is collections.OrderedDict
    assert ema_model.weights._metadata == model.state_dict()._metadata
    for name, tensor in model.state_dict().items():
        kept = ema_model.weights[name]
        assert torch.equal(kept, tensor), name
        assert kept.untyped_storage().nbytes() == kept.numel() * kept.element_size(), name
    moments = [t for s in fresh_opt.state.values() for t in s.values() if torch.is_tensor(t)]
    assert len(moments) == 3 * len(list(fresh.parameters()))  # step, exp_avg, exp_avg_sq
    for tensor in moments:
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    for live, saved in zip(fresh_opt.state.values(), opt.state.values(), strict=True):
        assert all(torch.equal(live[k], saved[k]) for k in saved)

    # a rollback into the same optimizer: its moments are restored in place, no new memory
    def moment_memory() -> list[int]:
        # (the first layer's moments: views of the mapped file when read; tensors under
        # safetensors_io.OWN_STORAGE_BELOW are decoded into memory of their own, adopted)
        return [
            t.data_ptr()
            for s in fresh_opt.state.values()
            for t in s.values()
            if t.numel() >= 512 * 512
        ]

    before = moment_memory()
    assert len(before) == 2
    fresh(torch.randn(2, 512)).sum().backward()
    fresh_opt.step()
    mlflow_ckpt.load(mlflow_ckpt.latest_checkpoint(mgr.run_id), {"optimizer": fresh_opt})
    if compression is None:  # (decoded moments own fresh memory: they are adopted)
        assert moment_memory() == before
    for live, saved in zip(fresh_opt.state.values(), opt.state.values(), strict=True):
        assert all(torch.equal(live[k], saved[k]) for k in saved)

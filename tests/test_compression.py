"""compression="zstd": bit-exact round trips, ratios, corrupt and hostile compressed files."""

from __future__ import annotations

import io
import json
import resource
import shutil
import struct
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import mlflow_ckpt
from mlflow_ckpt.catalog import export_safetensors
from mlflow_ckpt.catalog.reader import read_checkpoint
from mlflow_ckpt.catalog.resolve import resolve
from mlflow_ckpt.codec import planes as byte_planes
from mlflow_ckpt.codec import zstd_io
from mlflow_ckpt.codec.planar import PlanarTensor
from mlflow_ckpt.snapshot import direct as direct_module
from mlflow_ckpt.snapshot.direct import planar_names
from tests.conftest import StoreUnderTest
from tests.test_hostile import assert_untouched, folder, fresh_model, params_of, resign, save_run

MB = 1024 * 1024


def every_dtype() -> dict[str, torch.Tensor]:
    """One tensor of each dtype the format stores; the float ones span several 4 MiB blocks."""
    torch.manual_seed(0)
    weights = torch.randn(3 * MB + 5) * 0.02
    state = {
        "bf16": weights.to(torch.bfloat16),
        "fp16": weights[: MB + 3].to(torch.float16),
        "fp32": weights,
        "fp64": weights[:1000].double(),
        "c64": torch.randn(300, dtype=torch.complex64),
        "i8": torch.randint(-128, 127, (1001,), dtype=torch.int8),
        "u8": torch.randint(0, 255, (999,), dtype=torch.uint8),
        "i16": torch.randint(-1000, 1000, (77,), dtype=torch.int16),
        "i32": torch.arange(5000, dtype=torch.int32),
        "i64": torch.arange(-3, 2 * MB, dtype=torch.int64),
        "bool": torch.rand(333) > 0.5,
        "zeros": torch.zeros(2 * MB),
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(3.5),
        "strided": torch.randn(64, 32).t(),
    }
    for name in ("float8_e4m3fn", "float8_e5m2"):
        if hasattr(torch, name):
            state[name] = weights[:4097].to(getattr(torch, name))
    return state


@pytest.mark.parametrize(
    ("async_save", "native"),
    [(False, True), (True, True), (False, False)],
    ids=["sync", "async", "sync-numpy-planes"],
)
def test_every_dtype_round_trips_bit_for_bit(
    tracking: str, async_save: bool, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both byte-plane kernels: the C one (built by the install) and NumPy (its fallback)."""
    assert_native_kernel_built()
    monkeypatch.setattr(byte_planes, "NATIVE", native)
    state = every_dtype()
    with mlflow.start_run(run_name="zstd") as run:
        with mlflow_ckpt.CheckpointManager(
            state, async_save=async_save, compression="zstd", timeline=False
        ) as mgr:
            mgr.save(1)
    ckpt = mlflow_ckpt.latest_checkpoint(run.info.run_id)
    files = sorted(p.name for p in folder(ckpt).iterdir())
    assert [f for f in files if f.startswith("tensors-")] == ["tensors-00001-of-00001.ztensors"]
    manifest = json.loads((folder(ckpt) / "manifest.json").read_text())
    assert (manifest["format_version"], manifest["compression"]) == (4, "zstd")
    raw = mlflow_ckpt.load_training_state(ckpt.uri)
    for name, tensor in state.items():
        got = raw[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        bits = (lambda t: t.contiguous().reshape(-1).view(torch.uint8)) if tensor.numel() else None
        assert bits is None or torch.equal(bits(got), bits(tensor)), name
    raw_bytes = sum(t.numel() * t.element_size() for t in state.values())
    assert ckpt.stored_bytes < raw_bytes <= ckpt.size_bytes  # size_bytes is the logical size


def assert_native_kernel_built() -> None:
    """The install builds the C kernel wherever a compiler is (CI has one): a broken build
    would otherwise pass unseen, on the NumPy fallback."""
    assert byte_planes.NATIVE or shutil.which("cc") is None, "mlflow_ckpt.codec._planes"


@pytest.mark.parametrize("planes", [2, 4, 8])
def test_byte_plane_kernels_agree_and_invert(planes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The C kernel (SSE2 for 16 elements at a time, a loop for the rest) and NumPy give the
    same bytes, for lengths on and off the vector width, and merge undoes split."""
    assert_native_kernel_built()
    rng = np.random.default_rng(planes)
    for count in (0, 1, 15, 16, 17, 33, 1000, 4099):
        raw = rng.integers(0, 256, count * planes, dtype=np.uint8)
        expected = [raw[i::planes].copy() for i in range(planes)]
        for native in (True, False):
            monkeypatch.setattr(byte_planes, "NATIVE", native)
            got = byte_planes.split(raw, planes)
            assert [g.tobytes() for g in got] == [e.tobytes() for e in expected], (native, count)
            out = np.full(raw.size, 7, np.uint8)
            byte_planes.merge(expected, out)
            assert out.tobytes() == raw.tobytes(), (native, count)


def test_the_native_kernel_refuses_mismatched_buffers() -> None:
    assert_native_kernel_built()
    kernel = byte_planes._kernel()
    if kernel is None:
        pytest.skip("no C compiler here: the package runs on its NumPy fallback")
    planes = [np.zeros(4, np.uint8), np.zeros(5, np.uint8)]
    with pytest.raises(ValueError, match="one length"):
        kernel.merge(np.zeros(9, np.uint8), planes)
    with pytest.raises(ValueError, match="fill the whole buffer"):
        kernel.merge(np.zeros(9, np.uint8), [np.zeros(4, np.uint8)] * 2)
    with pytest.raises(ValueError, match="1 to 8 planes"):
        kernel.split(np.zeros(9, np.uint8), [np.zeros(1, np.uint8)] * 9)
    with pytest.raises((BufferError, TypeError)):  # read-only output
        kernel.merge(bytes(8), [np.zeros(4, np.uint8)] * 2)


def test_bf16_weights_shrink_and_noise_is_stored_as_is(tracking: str) -> None:
    """bf16 N(0, 0.02) weights: byte planes make the exponents compress (<= 0.72x raw);
    random bytes do not compress and are stored raw (a few bytes of index more)."""
    torch.manual_seed(1)
    weights = (torch.randn(8 * MB) * 0.02).to(torch.bfloat16)
    noise = torch.randint(0, 256, (8 * MB,), dtype=torch.uint8)
    sizes = {}
    for name, tensor in (("weights", weights), ("noise", noise)):
        with mlflow.start_run(run_name=name) as run:
            with mlflow_ckpt.CheckpointManager(
                {"t": tensor}, async_save=False, compression="zstd", timeline=False
            ) as mgr:
                mgr.save(0)
        (shard,) = folder(mlflow_ckpt.latest_checkpoint(run.info.run_id)).glob("tensors-*")
        sizes[name] = shard.stat().st_size / (tensor.numel() * tensor.element_size())
    assert sizes["weights"] <= 0.72, sizes
    assert 1.0 <= sizes["noise"] < 1.001, sizes


def test_fast_levels_store_planes_saving_under_a_bit_per_byte_as_they_are() -> None:
    """Bytes with ~7.4 bits of entropy (zstd saves ~7%): stored as is at zstd's fast levels
    (decoding them would cost a load more than the bytes saved), compressed from level 3 up
    (the caller asked for size). Both read back bit for bit."""
    torch.manual_seed(3)
    n = 8 * MB
    top = torch.multinomial(torch.tensor([0.7, 0.1, 0.1, 0.1]), n, replacement=True)
    data = (torch.randint(0, 64, (n,)) + 64 * top).to(torch.uint8)
    for level, codec in ((-1, "raw"), (1, "raw"), (2, "raw"), (3, "zstd"), (5, "zstd")):
        f = io.BytesIO()
        zstd_io.write(f, [("t", data)], level=level)
        stored = f.getvalue()
        index, _ = _frame_plane(stored)
        codecs = {c for _, spans in index["t"]["blocks"] for c, _ in spans}
        assert codecs == {codec}, (level, codecs)
        if codec == "zstd":
            assert len(stored) < 0.95 * n, (level, len(stored) / n)
        buffer = torch.frombuffer(bytearray(stored), dtype=torch.uint8)
        decoded, _ = zstd_io.read_buffer(buffer, "t.ztensors", "test")
        assert torch.equal(decoded["t"], data), level


def test_many_blocks_decode_bit_for_bit_through_each_threads_scratch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Blocks of 4 KiB, so hundreds of them, compressed and stored planes mixed, decoded on
    several threads: each thread's decoded planes pass through one scratch block of its
    own, reused from block to block, and every tensor reads back bit for bit, whether its
    planes are interleaved at once or kept (``PlanarTensor``) to be interleaved later."""
    monkeypatch.setattr(zstd_io, "BLOCK_BYTES", 4096)
    torch.manual_seed(5)
    weights = torch.randn(64 * 1024) * 0.02
    state = {
        "fp32": weights,
        "bf16": weights.to(torch.bfloat16),
        "fp64": weights.to(torch.float64) * 1e3,
        "int64": torch.randint(-9, 9, (3000,)),
        "bool": torch.rand(5000) > 0.5,
        "kept/fp32": weights.flip(0).clone(),
        "kept/fp16": weights.to(torch.float16),
    }
    f = io.BytesIO()
    zstd_io.write(f, list(state.items()))
    index, _ = _frame_plane(f.getvalue())
    assert len(index["fp32"]["blocks"]) == 64
    codecs = {c for entry in index.values() for _, spans in entry["blocks"] for c, _ in spans}
    assert codecs == {"zstd", "raw"}
    buffer = torch.frombuffer(bytearray(f.getvalue()), dtype=torch.uint8)
    for _ in range(3):  # (scratch blocks reused across reads too: nothing left over)
        decoded, _ = zstd_io.read_buffer(
            buffer, "t.ztensors", "test", planar=lambda name: name.startswith("kept/")
        )
        for name, tensor in state.items():
            got = decoded[name]
            assert isinstance(got, PlanarTensor) == name.startswith("kept/"), name
            if isinstance(got, PlanarTensor):
                got = got.materialize()
            assert got.dtype == tensor.dtype and torch.equal(
                got.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)
            ), name


def test_export_of_a_compressed_checkpoint_is_a_standard_safetensors_file(
    tracking: str, tmp_path: Path
) -> None:
    state = {"model": fresh_model(), "big": (torch.randn(MB) * 0.02).to(torch.bfloat16)}
    _, (ckpt,) = save_run(state=state, compression="zstd", compression_level=5)
    out = tmp_path / "weights.safetensors"
    export_safetensors(ckpt.uri, out, key="model")
    loaded = load_file(str(out))  # the safetensors library itself reads it
    expected = state["model"].state_dict()
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[name], value) for name, value in expected.items())


def _frame_plane(data: bytes) -> tuple[dict, int]:
    """The index of a .ztensors file and where its body ends."""
    (length,) = struct.unpack("<Q", data[-16:-8])
    body = len(data) - 16 - length
    return json.loads(data[body : body + length]), body


@pytest.mark.parametrize("broken", ["w", "model/2.weight"], ids=["tensor", "module"])
def test_a_broken_zstd_frame_is_reported_as_corruption_naming_the_file(
    tracking: str, broken: str
) -> None:
    """The file's hash is forged to match (so only the decoder stands in the way). A frame
    of a plain module's tensor (decoded when read, interleaved into the module by the
    restore) is caught before anything is restored, like any other."""
    state = {"model": planar_net(0), "w": (torch.randn(MB) * 0.02).to(torch.bfloat16)}
    _, (ckpt,) = save_run(state=state, compression="zstd")
    (shard,) = folder(ckpt).glob("tensors-*")
    data = bytearray(shard.read_bytes())
    index, _ = _frame_plane(bytes(data))
    offset, frame = 0, None
    for name in index:  # break the content of the tensor's first zstd frame
        for _raw, spans in index[name]["blocks"]:
            for codec, stored in spans:
                if name == broken and codec == "zstd" and frame is None:
                    frame = offset + stored // 2
                offset += stored
    assert frame is not None
    data[frame] ^= 0xFF
    data[frame + 1] ^= 0xFF
    resign(folder(ckpt), {shard.name: bytes(data)})
    target = {"model": planar_net(7), "w": torch.zeros(MB, dtype=torch.bfloat16)}
    assert (broken in planar_names(target)) == (broken != "w")
    before = params_of(target["model"])
    with pytest.raises(mlflow_ckpt.CheckpointCorruptedError) as info:
        mlflow_ckpt.load(ckpt.uri, target)
    assert info.value.path == shard.name and shard.name in str(info.value)
    assert repr(broken) in str(info.value)
    assert_untouched(target["model"], before)
    assert not target["w"].any()


def planar_net(seed: int) -> torch.nn.Module:
    """fp32 and bf16 layers and a BatchNorm (its own ``_load_from_state_dict``, known)."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(512, 1024), torch.nn.BatchNorm1d(1024), torch.nn.Linear(1024, 8)
    )
    net[2].to(torch.bfloat16)
    net[1].running_mean.normal_()  # (a buffer, not only parameters)
    return net


def test_a_plain_module_takes_its_compressed_tensors_straight_into_its_parameters(
    tracking: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its compressed tensors are read as decoded planes (``PlanarTensor``: no new memory
    to interleave into) and interleaved into its own parameters and buffers by the restore:
    the same memory, bit for bit, with version counters moved (autograd and incremental
    saves see the write). The optimizer's moments are ordinary tensors."""
    saved = planar_net(0)
    opt = torch.optim.AdamW(saved[0].parameters())
    saved[0](torch.randn(4, 512)).square().sum().backward()
    opt.step()
    _, (ckpt,) = save_run(state={"model": saved, "optimizer": opt}, compression="zstd")
    model = planar_net(1)
    target = {"model": model, "optimizer": torch.optim.AdamW(model[0].parameters())}
    decoded = read_checkpoint(resolve(ckpt.uri, mlflow.MlflowClient()), into=target).decoded
    planar = {name for name, t in decoded.tensors.items() if isinstance(t, PlanarTensor)}
    assert planar == {
        f"model/{key}"
        for key, t in saved.state_dict().items()
        if t.dtype in (torch.float32, torch.bfloat16)
    }
    assert type(decoded.tensors["optimizer/state/0/exp_avg"]) is torch.Tensor
    memory = {k: (t.data_ptr(), t._version) for k, t in model.state_dict(keep_vars=True).items()}

    def no_new_memory(self: PlanarTensor) -> torch.Tensor:
        raise AssertionError("a plain module's tensor was interleaved into new memory")

    monkeypatch.setattr(PlanarTensor, "materialize", no_new_memory)
    mlflow_ckpt.load(ckpt.uri, target)
    for key, tensor in model.state_dict(keep_vars=True).items():
        assert tensor.data_ptr() == memory[key][0], key  # restored in place
        assert tensor._version > memory[key][1], key
        assert torch.equal(
            tensor.view(-1).view(torch.uint8), saved.state_dict()[key].view(-1).view(torch.uint8)
        ), key
    assert torch.equal(
        target["optimizer"].state_dict()["state"][0]["exp_avg"],
        opt.state_dict()["state"][0]["exp_avg"],
    )


def test_a_tied_weight_is_interleaved_in_place_and_stays_tied(
    tracking: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A weight two layers share is stored once and read as one ``PlanarTensor`` under both
    keys: ``load_state_dict`` copies each key into the one parameter, so the planes are
    interleaved into it (twice, as the plain path copies twice), never into new memory,
    and both layers still share it."""

    def tied(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
        net[1].weight = net[0].weight
        return net

    saved = tied(0)
    _, (ckpt,) = save_run(state={"model": saved}, compression="zstd")
    model = tied(1)
    writes: list[int] = []
    original = direct_module.write_all

    def counted(pairs: list[tuple[PlanarTensor, torch.Tensor]]) -> None:
        writes.extend(dest.data_ptr() for _, dest in pairs)
        original(pairs)

    def no_new_memory(self: PlanarTensor) -> torch.Tensor:
        raise AssertionError("the tied weight was interleaved into new memory")

    monkeypatch.setattr(direct_module, "write_all", counted)
    monkeypatch.setattr(PlanarTensor, "materialize", no_new_memory)
    weight = model[0].weight
    mlflow_ckpt.load(ckpt.uri, {"model": model})
    assert model[1].weight is model[0].weight is weight
    assert set(writes) == {t.data_ptr() for t in model.state_dict().values()}
    assert writes.count(weight.data_ptr()) == 2  # (under both keys, as load_state_dict does)
    for key, tensor in saved.state_dict().items():
        assert torch.equal(model.state_dict()[key], tensor), key


def test_modules_with_loading_code_of_their_own_restore_as_from_plain_tensors(
    tracking: str,
) -> None:
    """A load hook may read, convert or move what it is given between keys, a class may
    load in its own way: such modules get exactly what ``load_state_dict`` with decoded
    tensors gives them. Here a pre-hook swaps two same-shaped tensors (each written from
    the other's saved bytes, not from a parameter already overwritten) and scales a third,
    and a class of its own loads through its parent; the expected result is the same
    hooks run over the checkpoint's tensors on an uncompressed path."""
    torch.manual_seed(0)
    saved = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    _, (ckpt,) = save_run(state={"model": saved}, compression="zstd")

    def swap_and_scale(module: torch.nn.Module, sd: dict, *_: object) -> None:
        sd["0.weight"], sd["1.weight"] = sd["1.weight"], sd["0.weight"]
        sd["0.bias"] = sd["0.bias"] * 2

    class Legacy(torch.nn.Linear):
        def _load_from_state_dict(self, *args: object, **kwargs: object) -> None:
            super()._load_from_state_dict(*args, **kwargs)  # type: ignore[arg-type]

    def built(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
        net.register_load_state_dict_pre_hook(swap_and_scale)
        net[1].__class__ = Legacy
        return net

    expected = built(2)
    expected.load_state_dict({k: v.clone() for k, v in saved.state_dict().items()})
    model = built(3)
    assert "model/0.weight" in planar_names({"model": model})
    mlflow_ckpt.load(ckpt.uri, {"model": model})
    for key, tensor in expected.state_dict().items():
        assert torch.equal(model.state_dict()[key], tensor), key
    assert torch.equal(model[0].weight, saved[1].weight)


def test_a_tiny_file_claiming_gigabytes_is_refused_before_allocating(tracking: str) -> None:
    """A forged index says 4 GiB of float32 lie in 1,024 frames of one byte each: refused
    from the index alone (no valid zstd frame expands 1 byte into 1 MiB)."""
    _, (ckpt,) = save_run(state={"w": torch.zeros(10)}, compression="zstd")
    (shard,) = folder(ckpt).glob("tensors-*")
    blocks = [[4 * MB, [["zstd", 1]] * 4] for _ in range(1024)]
    index = json.dumps(
        {"w": {"dtype": "F32", "shape": [2**30], "planes": 4, "blocks": blocks}}
    ).encode()
    body = b"\x00" * (1024 * 4)
    forged = body + index + struct.pack("<Q", len(index)) + zstd_io.MAGIC
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    resign(folder(ckpt), {shard.name: forged})
    with pytest.raises(mlflow_ckpt.CheckpointCorruptedError, match="claims") as info:
        mlflow_ckpt.load_training_state(ckpt.uri)
    assert info.value.path == shard.name
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert grown_kb < 200 * 1024  # nothing near 4 GiB was ever touched


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"compression": "lz4"}, "compression must be None or 'zstd'"),
        ({"compression": "zstd", "format": "torch"}, "format='safetensors'"),
        ({"compression": "zstd", "compression_level": 99}, "compression_level=99"),
        ({"compression": "zstd", "compression_level": True}, "compression_level=True"),
    ],
)
def test_bad_compression_arguments_are_refused_first(
    tracking: str, kwargs: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        mlflow_ckpt.CheckpointManager({"w": torch.zeros(3)}, **kwargs)
    assert mlflow.active_run() is None


def test_compressed_checkpoints_on_every_store(store: StoreUnderTest) -> None:
    state = {"w": (torch.randn(2 * MB) * 0.02).to(torch.bfloat16), "b": torch.arange(9)}
    with mlflow.start_run(run_name="zstd-store") as run:
        with mlflow_ckpt.CheckpointManager(
            state, async_save=True, compression="zstd", timeline=False
        ) as mgr:
            mgr.save(3)
    restored = {"w": torch.zeros_like(state["w"]), "b": torch.zeros(9, dtype=torch.int64)}
    mlflow_ckpt.load(mlflow_ckpt.latest_checkpoint(run.info.run_id), restored)
    assert torch.equal(restored["w"], state["w"]) and torch.equal(restored["b"], state["b"])


def test_size_is_logical_and_stored_is_what_the_store_holds(tracking: str) -> None:
    from click.testing import CliRunner

    from mlflow_ckpt.cli import main as cli

    weights = (torch.randn(4 * MB) * 0.02).to(torch.bfloat16)  # 8 MiB
    ckpts = {}
    for compression in (None, "zstd"):
        with mlflow.start_run(run_name=f"sizes-{compression}") as run:
            with mlflow_ckpt.CheckpointManager(
                {"w": weights}, async_save=False, compression=compression, timeline=False
            ) as mgr:
                mgr.save(0)
        ckpts[compression] = mlflow_ckpt.latest_checkpoint(run.info.run_id)
    plain, packed = ckpts[None], ckpts["zstd"]
    on_disk = sum(p.stat().st_size for p in folder(packed).iterdir())
    assert plain.size_bytes == plain.stored_bytes
    assert packed.stored_bytes == on_disk - (folder(packed) / "manifest.json").stat().st_size
    assert packed.size_bytes >= 8 * MB > packed.stored_bytes / 0.72
    out = CliRunner().invoke(cli, ["list", packed.run_id]).output
    assert "stored" in out.splitlines()[0] and "8.0MB  5.5MB" in out, out

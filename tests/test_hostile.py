"""Hostile and bad input: forged, tampered or nonsensical checkpoints are refused cleanly.

Every attack here is re-signed: the attacker rewrites ``manifest.json`` so that every size and
SHA-256 matches the tampered files, which means the integrity check passes and the bytes
reach the parsers. What must hold then:

- no pickled code ever runs (a marker file that the payload would create never appears);
- the error is a ``CheckpointError`` (usually ``CheckpointCorruptedError``) naming the file;
- nothing is restored into the user's objects (restore is all-or-nothing);
- nothing outside the checkpoint folder is opened (Python's audit hooks watch every open).

Real MLflow throughout (sqlite tracking store, local artifacts); nothing is mocked.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import io
import json
import math
import os
import pickle
import random
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

import mlflow_ckpt
from mlflow_ckpt.cli import main as cli_main
from mlflow_ckpt.codec.hashing import hash_bytes

# ---------------------------------------------------------------- shared helpers


def tiny() -> torch.nn.Module:
    """A tiny network; also the ``model_factory`` of the pyfunc checkpoints below."""
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


FACTORY = f"{__name__}:tiny"


def fresh_model(seed: int = 123) -> torch.nn.Module:
    torch.manual_seed(seed)
    return tiny()


def params_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_untouched(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys()
    for key, value in after.items():
        assert torch.equal(value, before[key]), f"{key} was changed by a failed load"


def save_run(
    fmt: str = "safetensors",
    steps: tuple[int, ...] = (0,),
    state: dict[str, Any] | None = None,
    **kwargs: Any,
) -> tuple[str, list[mlflow_ckpt.Checkpoint]]:
    """One run with a checkpoint at each of ``steps``; returns the run ID and its checkpoints."""
    if state is None:
        torch.manual_seed(0)
        state = {"model": tiny()}
    with mlflow.start_run(run_name="hostile") as run:
        with mlflow_ckpt.CheckpointManager(
            state, format=fmt, async_save=False, save_last=False, **kwargs
        ) as mgr:
            for s in steps:
                mgr.save(s)
    return run.info.run_id, mlflow_ckpt.list_checkpoints(run.info.run_id)


def folder(ckpt: mlflow_ckpt.Checkpoint) -> Path:
    return Path(ckpt.artifact_location)


def read_manifest(ckpt_folder: Path) -> dict[str, Any]:
    return json.loads((ckpt_folder / "manifest.json").read_text())


def resign(
    ckpt_folder: Path,
    files: dict[str, bytes] | None = None,
    edit: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None,
) -> None:
    """Write tampered ``files``, then forge the manifest: every listed file's size and
    SHA-256 recomputed so that hash verification passes, and the manifest digest tag on
    the LoggedModel updated. ``edit`` changes the manifest further (after re-hashing)."""
    for name, data in (files or {}).items():
        (ckpt_folder / name).write_bytes(data)
    manifest = read_manifest(ckpt_folder)
    for entry in manifest["files"]:
        path = ckpt_folder / entry["path"]
        if path.is_file():
            data = path.read_bytes()
            entry["size"] = len(data)
            entry[hash_key(entry)] = hash_bytes(data, hash_key(entry))
    if edit is not None:
        manifest = edit(manifest) or manifest
    put_manifest(ckpt_folder, json.dumps(manifest, indent=1).encode())


def put_manifest(ckpt_folder: Path, data: bytes) -> None:
    """Write ``manifest.json`` and forge the digest the catalog recorded for it at commit:
    the attacker can write to the tracking store too, so only the parsers stand in the way."""
    (ckpt_folder / "manifest.json").write_bytes(data)
    MlflowClient().set_logged_model_tags(
        ckpt_folder.parent.name, {"mlflow_ckpt.manifest_sha256": hashlib.sha256(data).hexdigest()}
    )


def shard_of(ckpt_folder: Path) -> Path:
    (shard,) = sorted(ckpt_folder.glob("tensors-*"))
    return shard


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli_main, list(args))
    return result.exit_code, result.output


def assert_clean_cli_failure(code: int, output: str, *needles: str) -> None:
    assert code != 0, output
    assert "Traceback" not in output, output
    for needle in needles:
        assert needle in output, output


# Python's audit hooks see every file a Python-level open() touches (hashing, JSON, torch.load).
_OPENED: list[str] | None = None
_HOOKED = False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _OPENED is not None and event == "open" and args and isinstance(args[0], str | Path):
        _OPENED.append(os.path.realpath(os.fspath(args[0])))


@contextlib.contextmanager
def recording_opens() -> Iterator[list[str]]:
    global _OPENED, _HOOKED
    if not _HOOKED:
        sys.addaudithook(_audit)
        _HOOKED = True
    _OPENED = []
    try:
        yield _OPENED
    finally:
        _OPENED = None


# ---------------------------------------------------------------- 1. pickles never run


class _SystemPayload:
    """Unpickling this runs ``os.system`` (creates the marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


class _ExecPayload:
    """Unpickling this runs ``builtins.exec`` on attacker source (creates the marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def evil_torch_file(marker: Path, kind: str) -> bytes:
    """A ``torch.save`` zip (or, ``legacy``, a bare pickle) whose unpickling runs code."""
    if kind == "legacy":
        return pickle.dumps({"model.0.weight": _SystemPayload(marker)}, protocol=2)
    payload = _SystemPayload(marker) if kind == "system" else _ExecPayload(marker)
    buf = io.BytesIO()
    torch.save({"model.0.weight": torch.zeros(4, 3), "evil": payload}, buf)
    return buf.getvalue()


def test_payloads_really_run_when_unpickled_unsafely(tmp_path: Path) -> None:
    """Control: the payloads are live. Loading them the unsafe way creates the marker."""
    for kind in ("system", "exec", "legacy"):
        marker = tmp_path / f"control-{kind}"
        data = evil_torch_file(marker, kind)
        if kind == "legacy":
            pickle.loads(data)  # the point of the control
        else:
            torch.load(io.BytesIO(data), weights_only=False)
        assert marker.exists(), kind


@pytest.mark.parametrize("kind", ["system", "exec", "legacy"])
def test_malicious_torch_pickle_never_executes(tracking: str, tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "PWNED"
    run_id, ckpts = save_run("torch", steps=(0, 1), model_factory=FACTORY)
    newest, older = ckpts
    ckpt_folder = folder(newest)
    shard = shard_of(ckpt_folder)
    resign(ckpt_folder, {shard.name: evil_torch_file(marker, kind)})
    model = fresh_model()
    before = params_of(model)

    with pytest.raises(mlflow_ckpt.CheckpointCorruptedError) as info:
        mlflow_ckpt.load(newest, {"model": model})
    assert info.value.path == shard.name and shard.name in str(info.value)
    assert newest.model_id in str(info.value)
    assert_untouched(model, before)
    with pytest.raises(mlflow_ckpt.CheckpointCorruptedError, match=shard.name):
        mlflow_ckpt.load_training_state(newest.uri)
    with pytest.raises(mlflow_ckpt.CheckpointCorruptedError, match=shard.name):
        mlflow_ckpt.load_model(newest.uri)
    with pytest.raises(mlflow_ckpt.CheckpointError, match=shard.name):
        mlflow.pyfunc.load_model(newest.uri)

    code, out = cli("show", newest.uri)
    assert_clean_cli_failure(code, out, shard.name)
    code, out = cli("verify", newest.uri)
    assert_clean_cli_failure(code, out, "CORRUPT", shard.name)
    code, out = cli("verify", run_id)
    assert_clean_cli_failure(code, out, "CORRUPT", shard.name)
    assert not marker.exists()

    with pytest.warns(UserWarning, match=f"Skipping checkpoint {newest.uri}"):
        mgr = mlflow_ckpt.CheckpointManager.resume(run_id, {"model": model})
    assert mgr.resumed_from == older and mgr.start_step == 1
    mgr.close()
    assert not marker.exists()


def test_pickle_where_json_or_yaml_is_expected_is_never_unpickled(
    tracking: str, tmp_path: Path
) -> None:
    marker = tmp_path / "PWNED"
    evil = pickle.dumps(_SystemPayload(marker))
    _, (ckpt,) = save_run("safetensors", model_factory=FACTORY)
    ckpt_folder = folder(ckpt)
    originals = {p.name: p.read_bytes() for p in ckpt_folder.iterdir()}
    shard = shard_of(ckpt_folder).name
    for target in ["state.json", shard, "MLmodel"]:
        resign(ckpt_folder, {target: evil})
        with pytest.raises(Exception) as info:  # any refusal, checked below
            mlflow_ckpt.load_model(ckpt.uri)
        if target != "MLmodel":  # MLmodel is YAML parsed by MLflow itself
            assert isinstance(info.value, mlflow_ckpt.CheckpointCorruptedError), target
            assert info.value.path == target
        with pytest.raises(Exception):  # noqa: B017 - MLflow's pyfunc loader may wrap
            mlflow.pyfunc.load_model(ckpt.uri)
        for name, data in originals.items():
            (ckpt_folder / name).write_bytes(data)
    # a pickle as the manifest itself (which cannot be signed)
    (ckpt_folder / "manifest.json").write_bytes(evil)
    with pytest.raises(mlflow_ckpt.CheckpointCorruptedError, match=r"manifest\.json"):
        mlflow_ckpt.load(ckpt, {"model": fresh_model()})
    code, out = cli("verify", ckpt.uri)
    assert_clean_cli_failure(code, out, "manifest.json")
    assert not marker.exists()


def test_forged_model_factory_in_mlmodel_never_runs(tracking: str, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    _, (ckpt,) = save_run(model_factory=FACTORY)
    ckpt_folder = folder(ckpt)
    mlmodel = (ckpt_folder / "MLmodel").read_text()
    attacks = {
        "os:system": f"{{command: 'touch {marker}'}}",
        "subprocess:run": f"{{args: [touch, '{marker}']}}",
        "builtins:exec": f'{{source: \'open("{marker}", "w")\'}}',
        "pathlib:Path.touch": f"{{self: '{marker}'}}",
    }
    for factory, kwargs in attacks.items():
        forged = mlmodel.replace(f"model_factory: {FACTORY}", f"model_factory: {factory}")
        forged = forged.replace("model_kwargs: {}", f"model_kwargs: {kwargs}")
        assert forged != mlmodel
        resign(ckpt_folder, {"MLmodel": forged.encode()})
        with pytest.raises(mlflow_ckpt.CheckpointError, match="Refusing model factory"):
            mlflow_ckpt.load_model(ckpt.uri)
        assert not marker.exists(), factory


# ---------------------------------------------------------------- 2. safetensors parser


def split_safetensors(data: bytes) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def join_safetensors(header: dict[str, Any] | bytes, body: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def _tensor_names(header: dict[str, Any]) -> list[str]:
    names = [k for k in header if k != "__metadata__"]
    return sorted(names, key=lambda k: header[k]["data_offsets"][0])


def _huge_header_length(data: bytes) -> bytes:
    return struct.pack("<Q", 2**40) + data[8:]


def _header_longer_than_file(data: bytes) -> bytes:
    return struct.pack("<Q", len(data) + 1) + data[8:]


def _overlapping_offsets(data: bytes) -> bytes:
    header, body = split_safetensors(data)
    first, second = _tensor_names(header)[:2]
    header[second]["data_offsets"] = list(header[first]["data_offsets"])
    return join_safetensors(header, body)


def _out_of_range_offsets(data: bytes) -> bytes:
    header, body = split_safetensors(data)
    last = _tensor_names(header)[-1]
    start, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [start, end + 10**9]
    return join_safetensors(header, body)


def _dtype_vs_bytes(data: bytes) -> bytes:
    header, body = split_safetensors(data)
    header["model/0.weight"]["dtype"] = "F64"  # twice the bytes the offsets give it
    return join_safetensors(header, body)


def _shape_vs_bytes(data: bytes) -> bytes:
    header, body = split_safetensors(data)
    header["model/0.weight"]["shape"] = [4, 4]
    return join_safetensors(header, body)


def _header_not_json(data: bytes) -> bytes:
    (length,) = struct.unpack("<Q", data[:8])
    return data[:8] + b"{not json at all" + b" " * (length - 16) + data[8 + length :]


def _header_not_an_object(data: bytes) -> bytes:
    _, body = split_safetensors(data)
    return join_safetensors(b"[1, 2, 3]", body)


def _offsets_wrong_type(data: bytes) -> bytes:
    header, body = split_safetensors(data)
    header["model/0.weight"]["data_offsets"] = ["0", "48"]
    return join_safetensors(header, body)


def _truncated_body(data: bytes) -> bytes:
    return data[:-4]


def _unknown_dtype(data: bytes) -> bytes:
    header, body = split_safetensors(data)
    header["model/0.weight"]["dtype"] = "PICKLE"
    return join_safetensors(header, body)


SAFETENSORS_ATTACKS = {
    "header-length-2**40": _huge_header_length,
    "header-length-past-eof": _header_longer_than_file,
    "overlapping-offsets": _overlapping_offsets,
    "out-of-range-offsets": _out_of_range_offsets,
    "dtype-vs-byte-count": _dtype_vs_bytes,
    "shape-vs-byte-count": _shape_vs_bytes,
    "header-not-json": _header_not_json,
    "header-not-an-object": _header_not_an_object,
    "offsets-wrong-type": _offsets_wrong_type,
    "truncated-data": _truncated_body,
    "unknown-dtype": _unknown_dtype,
}


@pytest.mark.parametrize("attack", sorted(SAFETENSORS_ATTACKS))
def test_malformed_safetensors_is_refused_before_restoring(tracking: str, attack: str) -> None:
    _, (ckpt,) = save_run("safetensors")
    ckpt_folder = folder(ckpt)
    shard = shard_of(ckpt_folder)
    resign(ckpt_folder, {shard.name: SAFETENSORS_ATTACKS[attack](shard.read_bytes())})
    model = fresh_model()
    before = params_of(model)
    rng_before = torch.get_rng_state()
    with pytest.raises(mlflow_ckpt.CheckpointCorruptedError) as info:
        mlflow_ckpt.load(ckpt, {"model": model})
    assert info.value.path == shard.name and shard.name in str(info.value)
    assert_untouched(model, before)
    assert torch.equal(torch.get_rng_state(), rng_before)  # RNG streams not restored either
    code, out = cli("verify", ckpt.uri)
    assert_clean_cli_failure(code, out, "CORRUPT", shard.name)


_DIFFERENTIAL_DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2,
]  # fmt: skip


def _random_safetensors(rng: random.Random) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Tensors of random dtypes and shapes (0-d, empty, now and then over 1 MiB: a view
    of the buffer rather than a copy) under random names, and random metadata or none."""
    tensors = {}
    for i in range(rng.randint(0, 6)):
        dtype = rng.choice(_DIFFERENTIAL_DTYPES)
        shape = [rng.choice([0, 1, 2, 3, 7]) for _ in range(rng.randint(0, 3))]
        if rng.random() < 0.1:
            shape = [rng.randint(1, 3), 300_000]
        raw = torch.randint(0, 256, (math.prod(shape) * dtype.itemsize,), dtype=torch.uint8)
        name = rng.choice(["w", "model/0.weight", "état", "a.b#2", ""]) + str(i)
        tensors[name] = raw.view(dtype).reshape(shape)
    keys = [rng.choice(["format", "note", "ünïcode"]) for _ in range(rng.randint(0, 2))]
    metadata = {k: rng.choice(["pt", "", "x" * 50]) for k in keys} if rng.random() < 0.7 else None
    return tensors, metadata


def test_our_safetensors_reader_agrees_with_the_library_on_valid_files() -> None:
    """Differential: for valid files written by ``safetensors.torch.save`` (every dtype we
    store, bf16 and fp8 included, 0-d and empty tensors, metadata or none), our one reader
    gives exactly the tensors ``safetensors.torch.load`` and ``safetensors.deserialize``
    give, and offsets that point at each tensor's bytes. (A file the library writes and
    then refuses itself, we refuse too.)"""
    from safetensors import SafetensorError, deserialize
    from safetensors.torch import load, save

    from mlflow_ckpt.codec import safetensors_io

    rng = random.Random(31)
    for trial in range(200):
        tensors, metadata = _random_safetensors(rng)
        data = save(tensors, metadata=metadata)
        buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        try:
            theirs = load(data)
        except SafetensorError:  # (0.8.0 writes no tensors + empty metadata as bad JSON)
            with pytest.raises(mlflow_ckpt.CheckpointCorruptedError):
                safetensors_io.read_buffer(buffer, "x.safetensors", f"trial {trial}")
            continue
        ours, offsets = safetensors_io.read_buffer(buffer, "x.safetensors", f"trial {trial}")
        raw = {name: info["data"] for name, info in deserialize(data)}
        assert set(ours) == set(theirs) == set(raw) == set(tensors), trial
        for name, tensor in ours.items():
            expected = theirs[name]
            assert (tensor.dtype, tensor.shape) == (expected.dtype, expected.shape), name
            got = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
            assert got == expected.reshape(-1).view(torch.uint8).numpy().tobytes() == raw[name]
            offset, nbytes = offsets[name]
            assert offset is not None and data[offset : offset + nbytes] == raw[name], name


@pytest.mark.parametrize("attack", sorted(SAFETENSORS_ATTACKS))
def test_our_safetensors_reader_refuses_what_the_library_refuses(attack: str) -> None:
    """The other direction, on the attacks above: each file both parsers refuse."""
    from safetensors import SafetensorError
    from safetensors.torch import load, save

    from mlflow_ckpt.codec import safetensors_io

    torch.manual_seed(0)
    model = tiny()
    data = SAFETENSORS_ATTACKS[attack](
        save({f"model/{k}": v for k, v in model.state_dict().items()})
    )
    with pytest.raises((SafetensorError, ValueError, RuntimeError)):
        load(data)
    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    with pytest.raises(mlflow_ckpt.CheckpointCorruptedError, match=r"x\.safetensors"):
        safetensors_io.read_buffer(buffer, "x.safetensors", "test")


def _index_entry(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    (entry,) = [t for t in manifest["tensors"] if t["name"] == name]
    return entry


def _set(name: str, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(manifest: dict[str, Any]) -> None:
        _index_entry(manifest, name)[key] = value

    return edit


def _rename_in_index(manifest: dict[str, Any]) -> None:
    _index_entry(manifest, "model/0.bias")["name"] = "model/0.other"


def _drop_from_index(manifest: dict[str, Any]) -> None:
    manifest["tensors"] = [t for t in manifest["tensors"] if t["name"] != "model/0.bias"]


def _duplicate_in_index(manifest: dict[str, Any]) -> None:
    manifest["tensors"].append(dict(_index_entry(manifest, "model/0.bias")))


INDEX_ATTACKS = {
    "dtype": _set("model/0.weight", "dtype", "float64"),
    "shape": _set("model/0.weight", "shape", [3, 4]),
    "offset": _set("model/0.weight", "offset", 8),
    "nbytes": _set("model/0.weight", "nbytes", 4),
    "renamed": _rename_in_index,
    "missing": _drop_from_index,
    "duplicate": _duplicate_in_index,
}


def test_manifest_tensor_index_must_agree_with_the_file(tracking: str) -> None:
    _, (ckpt,) = save_run("safetensors")
    ckpt_folder = folder(ckpt)
    pristine = (ckpt_folder / "manifest.json").read_bytes()
    model = fresh_model()
    before = params_of(model)
    for attack, edit in INDEX_ATTACKS.items():
        resign(ckpt_folder, edit=edit)
        with pytest.raises(mlflow_ckpt.CheckpointCorruptedError) as info:
            mlflow_ckpt.load(ckpt, {"model": model})
        message = str(info.value)
        assert ckpt.model_id in message, attack
        assert shard_of(ckpt_folder).name in message or "manifest.json" in message, attack
        assert_untouched(model, before)
        put_manifest(ckpt_folder, pristine)
    mlflow_ckpt.load(ckpt, {"model": model})  # the pristine manifest still loads


def test_tensor_shape_consistent_with_bytes_but_not_with_index(tracking: str) -> None:
    """A header re-shaped consistently ([4, 3] -> [12]) passes safetensors' own checks;
    the manifest's index still catches it."""
    _, (ckpt,) = save_run("safetensors")
    ckpt_folder = folder(ckpt)
    shard = shard_of(ckpt_folder)
    header, body = split_safetensors(shard.read_bytes())
    header["model/0.weight"]["shape"] = [12]
    resign(ckpt_folder, {shard.name: join_safetensors(header, body)})
    model = fresh_model()
    before = params_of(model)
    with pytest.raises(mlflow_ckpt.CheckpointCorruptedError, match=r"the manifest says") as info:
        mlflow_ckpt.load(ckpt, {"model": model})
    assert info.value.path == shard.name
    assert_untouched(model, before)


# ---------------------------------------------------------------- 3. forged manifests


def _file_entry(manifest: dict[str, Any], path: str) -> dict[str, Any]:
    (entry,) = [f for f in manifest["files"] if f["path"] == path]
    return entry


def _path_attack(new_path: str) -> Callable[[dict[str, Any], Path], None]:
    def edit(manifest: dict[str, Any], sentinel: Path) -> None:
        # The forged entry carries the sentinel's real size and hash, so only the path check
        # stands between it and the file.
        data = sentinel.read_bytes()
        entry = _file_entry(manifest, "state.json")
        key = hash_key(entry)
        entry.update({"path": new_path, "size": len(data), key: hash_bytes(data, key)})
        manifest["structure_file"] = new_path

    return edit


MANIFEST_PATH_ATTACKS = {
    "absolute-etc-passwd": "/etc/passwd",
    "absolute-sentinel": "{abs}",
    "dotdot-sentinel": "{rel}",
    "dotdot-inside": "sub/../state.json",
    "dot-component": "./state.json",
    "backslashes": "..\\..\\sentinel.txt",
    "drive-letter": "C:/Windows/win.ini",
    "drive-relative": "C:state.json",
    "unc": "\\\\server\\share\\x",
    "nul-byte": "state.json\x00.txt",
    "empty": "",
    "trailing-slash": "state.json/",
}


def test_manifest_paths_outside_the_folder_are_refused_before_any_access(
    tracking: str, tmp_path: Path
) -> None:
    _, (ckpt,) = save_run()
    ckpt_folder = folder(ckpt)
    pristine = (ckpt_folder / "manifest.json").read_bytes()
    sentinel = tmp_path / "outside" / "sentinel.txt"
    sentinel.parent.mkdir()
    sentinel.write_text('{"version": 1, "state": {}}')
    model = fresh_model()
    before = params_of(model)
    for attack, template in MANIFEST_PATH_ATTACKS.items():
        path = template.format(abs=str(sentinel), rel=os.path.relpath(sentinel, ckpt_folder))
        resign(ckpt_folder, edit=lambda m, path=path: _path_attack(path)(m, sentinel))
        with (
            recording_opens() as opened,
            pytest.raises(mlflow_ckpt.CheckpointCorruptedError) as info,
        ):
            mlflow_ckpt.load(ckpt, {"model": model})
        assert "not a plain relative path" in str(info.value), attack
        assert str(sentinel.resolve()) not in opened, attack
        assert "/etc/passwd" not in opened, attack
        # refused while parsing the manifest: not one listed file was even hashed
        assert not [
            p
            for p in opened
            if p.startswith(str(ckpt_folder.resolve())) and not p.endswith("manifest.json")
        ], attack
        assert_untouched(model, before)
        put_manifest(ckpt_folder, pristine)


@pytest.mark.parametrize("target", ["state.json", "shard", "dir"])
def test_symlinks_out_of_the_folder_are_refused_unread(
    tracking: str, tmp_path: Path, target: str
) -> None:
    """A file in the folder that is a symlink to a file outside (hash forged to match)."""
    _, (ckpt,) = save_run()
    ckpt_folder = folder(ckpt)
    outside = tmp_path / "outside"
    outside.mkdir()
    name = shard_of(ckpt_folder).name if target == "shard" else "state.json"
    sentinel = outside / name
    sentinel.write_bytes((ckpt_folder / name).read_bytes())  # would even decode fine
    if target == "dir":
        # sub/ -> outside/, and the manifest names sub/state.json
        (ckpt_folder / "sub").symlink_to(outside, target_is_directory=True)
        resign(ckpt_folder, edit=lambda m: _path_attack("sub/state.json")(m, sentinel))
        name = "sub/state.json"
    else:
        (ckpt_folder / name).unlink()
        (ckpt_folder / name).symlink_to(sentinel)
        resign(ckpt_folder)
    model = fresh_model()
    before = params_of(model)
    with recording_opens() as opened, pytest.raises(mlflow_ckpt.CheckpointCorruptedError) as info:
        mlflow_ckpt.load(ckpt, {"model": model})
    assert info.value.path == name and name in str(info.value)
    assert str(sentinel.resolve()) not in opened
    assert_untouched(model, before)
    code, out = cli("verify", ckpt.uri)
    assert_clean_cli_failure(code, out, "CORRUPT", name)


def _dup_file(m: dict[str, Any]) -> None:
    m["files"].append(dict(m["files"][0]))


def _del(key: str) -> Callable[[dict[str, Any]], None]:
    def edit(m: dict[str, Any]) -> None:
        del m[key]

    return edit


def _top(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(m: dict[str, Any]) -> None:
        m[key] = value

    return edit


def _first_file(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(m: dict[str, Any]) -> None:
        m["files"][0][key] = value

    return edit


def hash_key(entry: dict[str, Any]) -> str:
    """The manifest key holding a file entry's digest (its algorithm)."""
    (key,) = [k for k in ("blake3", "sha256") if k in entry]
    return key


def _drop_file_key(m: dict[str, Any]) -> None:
    del m["files"][0][hash_key(m["files"][0])]


def _two_hashes(m: dict[str, Any]) -> None:
    m["files"][0]["sha256"] = m["files"][0]["blake3"]


MANIFEST_TYPE_ATTACKS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "duplicate-file": _dup_file,
    "missing-files": _del("files"),
    "missing-format-version": _del("format_version"),
    "missing-structure-file": _del("structure_file"),
    "missing-sha256": _drop_file_key,
    "files-is-string": _top("files", "state.json"),
    "files-is-object": _top("files", {"state.json": 1}),
    "tensors-is-null": _top("tensors", None),
    "size-is-string": _first_file("size", "123"),
    "size-negative": _first_file("size", -1),
    "size-huge": _first_file("size", 10**400),
    "size-float-inf": _first_file("size", 1e308 * 10),
    "size-bool": _first_file("size", True),
    "hash-not-hex": _first_file("blake3", "z" * 64),
    "hash-is-int": _first_file("blake3", 1234),
    "hash-short": _first_file("blake3", "ab" * 16),
    "two-hashes": _two_hashes,
    "hash-unknown-algorithm": lambda m: m["files"][0].update(md5=m["files"][0].pop("blake3")),
    "step-is-string": _top("step", "5"),
    "step-huge": _top("step", 10**30),
    "epoch-is-list": _top("epoch", [1]),
    "metrics-is-list": _top("metrics", [1, 2]),
    "metric-not-number": _top("metrics", {"loss": "abc"}),
    "metric-is-bool": _top("metrics", {"loss": True}),
    "created-at-string": _top("created_at", "yesterday"),
    "format-version-string": _top("format_version", "1"),
    "format-version-bool": _top("format_version", True),
    "format-version-zero": _top("format_version", 0),
    "format-unknown": _top("format", "pickle"),
    "triggers-is-string": _top("triggers", "best"),
    "shape-negative": lambda m: m["tensors"][0].update(shape=[-1, 3]),
    "shape-is-string": lambda m: m["tensors"][0].update(shape="4,3"),
    "offset-is-string": lambda m: m["tensors"][0].update(offset="8"),
    "top-level-list": lambda m: [m],
}


def test_manifest_with_wrong_types_is_refused(tracking: str) -> None:
    _, (ckpt,) = save_run()
    ckpt_folder = folder(ckpt)
    pristine = (ckpt_folder / "manifest.json").read_bytes()
    model = fresh_model()
    before = params_of(model)
    for attack, edit in MANIFEST_TYPE_ATTACKS.items():
        resign(ckpt_folder, edit=edit)
        with pytest.raises(mlflow_ckpt.CheckpointCorruptedError) as info:
            mlflow_ckpt.load(ckpt, {"model": model})
        assert ckpt.model_id in str(info.value), attack
        assert_untouched(model, before)
        put_manifest(ckpt_folder, pristine)


NOT_JSON = {
    "empty": b"",
    "not-utf8": b"\xff\xfe\x00garbage",
    "trailing-garbage": b'{"format_version": 1} trailing garbage',
    "deep-list": b"[" * 100_000 + b"]" * 100_000,
    "deep-object": b'{"a": ' * 50_000 + b"1" + b"}" * 50_000,
    "huge-int": b"1" * 5000,
}


def test_manifest_that_is_not_sane_json_is_refused(tracking: str) -> None:
    _, (ckpt,) = save_run()
    for attack, raw in NOT_JSON.items():
        put_manifest(folder(ckpt), raw)
        with pytest.raises(mlflow_ckpt.CheckpointCorruptedError, match=r"manifest\.json"):
            mlflow_ckpt.load(ckpt, {"model": fresh_model()})
        code, out = cli("show", ckpt.uri)
        assert_clean_cli_failure(code, out, "manifest.json")
        assert "not valid JSON" in out, attack


# ---------------------------------------------------------------- 4. forged state.json


class Refuses:
    """A Stateful that records whether it was restored into."""

    def __init__(self) -> None:
        self.loaded: Any = None

    def state_dict(self) -> dict[str, Any]:
        return {"position": 7}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded = state


def rich_state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return {
        "model": model,
        "opt": opt,
        "sampler": Refuses(),
        "py_rng": random.Random(5),
        "np_rng": np.random.default_rng(5),
        "counter": 3,
    }


def _set_model_entry(doc: dict[str, Any], key: str, value: Any) -> None:
    for pair in doc["state"]["model"]["value"]["__items__"]:
        if pair[0] == key:
            pair[1] = value


def _opt_state0(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["state"]["opt"]["value"]["state"]["__items__"][0][1]


def _opt_group0(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["state"]["opt"]["value"]["param_groups"][0]


DEEP = "<100000 nested lists>"  # spliced into the JSON text (json.dumps would recurse)

STATE_ATTACKS: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "tensor-not-in-index": (
        lambda d: _set_model_entry(d, "0.weight", {"__tensor__": "no-such-tensor"}),
        "no-such-tensor",
    ),
    "tensor-ref-not-string": (
        lambda d: _set_model_entry(d, "0.weight", {"__tensor__": 5}),
        "model/0.weight",
    ),
    "float-tag-wrong-payload": (lambda d: d["state"].update(counter={"__float__": 5}), "counter"),
    "float-tag-bad-string": (
        lambda d: d["state"].update(counter={"__float__": "1e999999"}),
        "counter",
    ),
    "unknown-tag": (lambda d: d["state"].update(counter={"__evil__": "os.system"}), "__evil__"),
    "unknown-stateful-kind": (
        lambda d: d["state"]["sampler"].update({"__stateful__": "os.system"}),
        "os.system",
    ),
    "stateful-kind-not-string": (
        lambda d: d["state"]["sampler"].update({"__stateful__": 1}),
        "sampler",
    ),
    "npscalar-bad-dtype": (
        lambda d: d["state"].update(counter={"__npscalar__": ["not-a-dtype", 1]}),
        "counter",
    ),
    "npscalar-object-dtype": (
        lambda d: d["state"].update(counter={"__npscalar__": ["|O", "os.system"]}),
        "counter",
    ),
    "npscalar-bad-value": (
        lambda d: d["state"].update(counter={"__npscalar__": ["<f8", "abc"]}),
        "counter",
    ),
    "npscalar-wrong-arity": (
        lambda d: d["state"].update(counter={"__npscalar__": ["<f8"]}),
        "counter",
    ),
    "bytes-bad-base64": (lambda d: d["state"].update(counter={"__bytes__": "!!"}), "counter"),
    "device-bogus": (lambda d: d["state"].update(counter={"__device__": "warp9:0"}), "counter"),
    "dtype-not-a-dtype": (
        lambda d: d["state"].update(counter={"__dtype__": "Tensor"}),
        "counter",
    ),
    "items-bad-pair": (lambda d: d["state"].update(counter={"__items__": [[1]]}), "counter"),
    "items-unhashable-key": (
        lambda d: d["state"].update(counter={"__items__": [[[1, 2], 3]]}),
        "counter",
    ),
    "set-unhashable": (lambda d: d["state"].update(counter={"__set__": [[1]]}), "counter"),
    "tuple-not-list": (lambda d: d["state"].update(counter={"__tuple__": "ab"}), "counter"),
    "deeply-nested": (lambda d: d["state"].update(counter=DEEP), "state.json"),
    "document-version": (lambda d: d.update(version=2), "version"),
    "state-not-object": (lambda d: d.update(state=[1]), "state"),
    "optimizer-step-string": (lambda d: _opt_state0(d).update(step="ten"), "opt/state/0/step"),
    "optimizer-moment-string": (
        lambda d: _opt_state0(d).update(exp_avg="zeros"),
        "opt/state/0/exp_avg",
    ),
    "optimizer-lr-string": (lambda d: _opt_group0(d).update(lr="fast"), "lr"),
    "optimizer-betas-wrong": (lambda d: _opt_group0(d).update(betas={"__tuple__": [0.9]}), "betas"),
    "optimizer-params-string": (lambda d: _opt_group0(d).update(params="all"), "opt"),
    "model-param-is-number": (
        lambda d: _set_model_entry(d, "0.weight", 3.0),
        "model.0.weight",
    ),
    "python-rng-garbage": (
        lambda d: d["state"]["py_rng"].update(value={"__tuple__": [3, "x", None]}),
        "py_rng",
    ),
    "numpy-rng-garbage": (
        lambda d: d["state"]["np_rng"].update(value={"bit_generator": "MT19937x"}),
        "np_rng",
    ),
    "global-rng-garbage": (lambda d: d["rng"].update(python={"__tuple__": [1]}), "_rng"),
    "global-torch-rng-garbage": (
        lambda d: d["rng"].update(torch=[1, 2, 3]),
        "_rng",
    ),
}


def test_forged_state_json_is_refused_before_anything_is_restored(tracking: str) -> None:
    _, (ckpt,) = save_run(state=rich_state())
    ckpt_folder = folder(ckpt)
    pristine = (ckpt_folder / "state.json").read_text()
    for attack, (edit, needle) in STATE_ATTACKS.items():
        document = json.loads(pristine)
        edit(document)
        raw = json.dumps(document).replace(json.dumps(DEEP), "[" * 100_000 + "]" * 100_000)
        resign(ckpt_folder, {"state.json": raw.encode()})
        _assert_refused_and_untouched(ckpt, attack, needle)
    resign(ckpt_folder, {"state.json": pristine.encode()})
    mlflow_ckpt.load(ckpt, rich_state())  # control: the untampered state restores fine


def _assert_refused_and_untouched(ckpt: mlflow_ckpt.Checkpoint, attack: str, needle: str) -> None:
    target = rich_state()
    with torch.no_grad():
        for p in target["model"].parameters():
            p.add_(1.0)
    model_before = params_of(target["model"])
    opt_state = {k: {n: v.clone() for n, v in s.items()} for k, s in target["opt"].state.items()}
    lr_before = target["opt"].param_groups[0]["lr"]
    py_before = target["py_rng"].getstate()
    np_before = target["np_rng"].bit_generator.state
    global_before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())

    with pytest.raises(mlflow_ckpt.CheckpointError) as info:
        mlflow_ckpt.load(ckpt, target)
    message = str(info.value)
    assert needle in message, (attack, message)
    # all-or-nothing: nothing was restored
    assert_untouched(target["model"], model_before)
    for key, saved in opt_state.items():
        for n, v in saved.items():
            assert torch.equal(target["opt"].state[key][n], v), attack
    assert target["opt"].param_groups[0]["lr"] == lr_before, attack
    assert target["sampler"].loaded is None, attack
    assert target["py_rng"].getstate() == py_before, attack
    assert target["np_rng"].bit_generator.state == np_before, attack
    assert target["counter"] == 3, attack
    assert random.getstate() == global_before[0], attack
    assert np.array_equal(np.random.get_state()[1], global_before[1]), attack
    assert torch.equal(torch.get_rng_state(), global_before[2]), attack
    # load_training_state refuses structural problems too (type problems need targets)
    if isinstance(info.value, mlflow_ckpt.CheckpointCorruptedError):
        assert info.value.path is not None, attack
        with pytest.raises(mlflow_ckpt.CheckpointCorruptedError):
            mlflow_ckpt.load_training_state(ckpt.uri)


# ---------------------------------------------------------------- 5. architecture mismatch


def test_optimizer_state_shapes_mismatch_while_model_matches(tracking: str) -> None:
    """The model fits, the optimizer's per-parameter state does not: neither is touched."""
    state = rich_state()
    _, (ckpt,) = save_run(state={"model": state["model"], "opt": state["opt"]})
    model = fresh_model()
    before = params_of(model)
    other = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(2, 4))  # same count
    wrong_opt = torch.optim.AdamW(other.parameters())
    with pytest.raises(mlflow_ckpt.StateMismatchError) as info:
        mlflow_ckpt.load(ckpt, {"model": model, "opt": wrong_opt})
    assert any(m.startswith("opt/state/0/exp_avg") for m in info.value.mismatched)
    assert not info.value.missing and not info.value.unexpected
    assert_untouched(model, before)
    assert wrong_opt.state_dict()["state"] == {}


class _Exploding(Refuses):
    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise ValueError("sampler cannot take this state")


def test_a_refusing_load_state_dict_leaves_model_and_optimizer_untouched(tracking: str) -> None:
    state = rich_state()
    _, (ckpt,) = save_run(
        state={"model": state["model"], "opt": state["opt"], "sampler": state["sampler"]}
    )
    target = rich_state()
    with torch.no_grad():
        for p in target["model"].parameters():
            p.mul_(2)
    before = params_of(target["model"])
    lr = target["opt"].param_groups[0]["lr"] = 0.5
    with pytest.raises(mlflow_ckpt.StateMismatchError, match="sampler cannot take this state"):
        mlflow_ckpt.load(
            ckpt, {"model": target["model"], "opt": target["opt"], "sampler": _Exploding()}
        )
    assert_untouched(target["model"], before)
    assert target["opt"].param_groups[0]["lr"] == lr


# ---------------------------------------------------------------- 6. NaN / inf metrics


@pytest.mark.parametrize("mode", ["min", "max"])
def test_best_is_found_from_ordered_pages_as_from_a_full_listing(
    tracking: str, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """best_checkpoint reads pages ordered by the metric in the tracking store and stops
    early: with pages of 2, NaN/inf anywhere and ties across page ends, it answers what a
    full listing answers (ties go to the newer step)."""
    from mlflow_ckpt.catalog import queries

    values = [5.0, math.nan, 1.0, math.inf, 1.0, -math.inf, 7.0, 1.0, math.nan, 7.0, 3.0]
    with mlflow.start_run(run_name="ordered") as run:
        with mlflow_ckpt.CheckpointManager(
            {"w": torch.zeros(2)}, async_save=False, save_last=False, timeline=False
        ) as mgr:
            for s, v in enumerate(values):
                mgr.save(s, {"loss": v})
    calls = []
    original = MlflowClient.search_logged_models

    def counted(self, *args, **kwargs):
        calls.append(kwargs.get("order_by"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(queries, "_BEST_PAGE", 2)
    monkeypatch.setattr(MlflowClient, "search_logged_models", counted)
    best = mlflow_ckpt.best_checkpoint(run_id=run.info.run_id, metric="loss", mode=mode)
    pages = len(calls)
    by_experiment = mlflow_ckpt.best_checkpoint(
        experiment_ids=[run.info.experiment_id], metric="loss", mode=mode
    )
    monkeypatch.setattr(MlflowClient, "search_logged_models", original)
    full = queries.pick_best(mlflow_ckpt.list_checkpoints(run.info.run_id), "loss", mode)
    assert best is not None and full is not None
    assert best.step == by_experiment.step == full.step == (7 if mode == "min" else 9)
    assert all(
        order == [{"field_name": "metrics.loss", "ascending": mode == "min"}] for order in calls
    )
    assert pages < math.ceil(len(values) / 2)  # stopped before the last page


@pytest.mark.parametrize(
    ("mode", "values", "best_steps", "best"),
    [
        ("min", [3.0, math.nan, -math.inf, 2.0, math.inf, 5.0], [0, 3], 3),
        ("max", [1.0, math.inf, math.nan, 0.5, 2.0, -math.inf], [0, 4], 4),
    ],
)
def test_non_finite_metrics_are_logged_but_never_best(
    tracking: str, mode: str, values: list[float], best_steps: list[int], best: int
) -> None:
    with mlflow.start_run(run_name="nan") as run:
        with mlflow_ckpt.CheckpointManager(
            {"w": torch.zeros(2)},
            save_every_n_steps=1,
            monitor="loss",
            mode=mode,
            keep_best_n=1,
            keep_last_n=1,
            async_save=False,
        ) as mgr:
            for s, v in enumerate(values):
                mgr.step(s, {"loss": v})
            assert mgr.best_value == values[best]
    run_id = run.info.run_id
    # every value reached the run's history, the non-finite ones included
    history = {m.step: m.value for m in MlflowClient().get_metric_history(run_id, "loss")}
    assert sorted(history) == list(range(len(values)))
    for s, v in enumerate(values):
        if math.isnan(v):
            assert math.isnan(history[s])
        elif math.isinf(v):
            assert math.isinf(history[s]) or abs(history[s]) >= sys.float_info.max
    # the BestMetric trigger fired only on finite improvements (retention kept its files
    # only for the best and the newest, so read the triggers off every LoggedModel)
    exp = run.info.experiment_id
    best_tagged = sorted(
        int(m.tags["mlflow_ckpt.step"])
        for m in MlflowClient().search_logged_models([exp])
        if "best" in m.tags.get("mlflow_ckpt.trigger", "")
    )
    assert set(best_tagged) <= set(best_steps) and best in best_tagged
    # keep_best_n=1 kept the finite best; keep_last_n=1 the newest
    kept = sorted(c.step for c in mlflow_ckpt.list_checkpoints(run_id))
    assert kept == sorted({best, len(values) - 1})
    chosen = mlflow_ckpt.best_checkpoint(run_id=run_id, metric="loss", mode=mode)
    assert chosen is not None and chosen.step == best
    chosen = mlflow_ckpt.best_checkpoint(experiment_ids=[exp], metric="loss", mode=mode)
    assert chosen is not None and chosen.step == best


def test_best_checkpoint_over_only_non_finite_values_is_none(tracking: str) -> None:
    with mlflow.start_run(run_name="nan") as run:
        with mlflow_ckpt.CheckpointManager(
            {"w": torch.zeros(2)}, save_every_n_steps=1, async_save=False
        ) as mgr:
            for s, v in enumerate([math.nan, math.inf, -math.inf]):
                mgr.step(s, {"loss": v})
    for mode in ("min", "max"):
        assert mlflow_ckpt.best_checkpoint(run_id=run.info.run_id, metric="loss", mode=mode) is None
    code, out = cli("best", "--experiment", "tests", "--metric", "loss")
    assert_clean_cli_failure(code, out, "finite")


# ---------------------------------------------------------------- 7. unknown / deleted / newer


def test_deleted_run_is_reported_everywhere(tracking: str) -> None:
    run_id, _ = save_run()
    mlflow.delete_run(run_id)
    for call in (
        lambda: mlflow_ckpt.list_checkpoints(run_id),
        lambda: mlflow_ckpt.latest_checkpoint(run_id),
        lambda: mlflow_ckpt.best_checkpoint(run_id=run_id, metric="loss"),
        lambda: mlflow_ckpt.CheckpointManager.resume(run_id, {"model": fresh_model()}),
    ):
        with pytest.raises(mlflow_ckpt.CheckpointNotFoundError, match="deleted") as info:
            call()
        assert run_id in str(info.value) and "mlflow runs restore" in str(info.value)
    assert mlflow.active_run() is None
    for args in (["list", run_id], ["verify", run_id], ["gc", run_id, "--keep-last", "1"]):
        code, out = cli(*args)
        assert_clean_cli_failure(code, out, run_id, "deleted")
        assert len(out.strip().splitlines()) == 1, out


def test_unknown_ids_are_reported_everywhere(tracking: str) -> None:
    bogus_run = "0123456789abcdef0123456789abcdef"
    bogus_model = "m-" + "0" * 32
    with pytest.raises(mlflow_ckpt.CheckpointNotFoundError, match=bogus_run):
        mlflow_ckpt.best_checkpoint(run_id=bogus_run, metric="loss")
    with pytest.raises(mlflow_ckpt.CheckpointNotFoundError, match=bogus_run):
        mlflow_ckpt.latest_checkpoint(bogus_run)
    with pytest.raises(mlflow_ckpt.CheckpointNotFoundError, match="not-a-run-id"):
        mlflow_ckpt.list_checkpoints("not-a-run-id")
    for call in (
        lambda: mlflow_ckpt.load_training_state(f"models:/{bogus_model}"),
        lambda: mlflow_ckpt.load_model(bogus_model),
    ):
        with pytest.raises(mlflow_ckpt.CheckpointNotFoundError, match=bogus_model) as info:
            call()
        assert "list_checkpoints" in str(info.value)
    for args in (
        ["list", bogus_run],
        ["verify", bogus_run],
        ["show", f"models:/{bogus_model}"],
        ["verify", f"models:/{bogus_model}"],
        ["diff", f"models:/{bogus_model}", f"models:/{bogus_model}"],
        ["show", "models:/no-such-registered-model@champion"],
    ):
        code, out = cli(*args)
        assert_clean_cli_failure(code, out)
        assert len(out.strip().splitlines()) == 1, out


def test_deleted_logged_model_is_reported(tracking: str) -> None:
    run_id, (newest, older) = save_run(steps=(0, 1))
    MlflowClient().delete_logged_model(newest.model_id)
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run_id)] == [0]
    for call in (
        lambda: mlflow_ckpt.load(newest, {"model": fresh_model()}),
        lambda: mlflow_ckpt.load(newest.uri, {"model": fresh_model()}),
        lambda: mlflow_ckpt.load_training_state(newest.uri),
    ):
        with pytest.raises(mlflow_ckpt.CheckpointNotFoundError, match=newest.model_id):
            call()
    for args in (["show", newest.uri], ["verify", newest.uri]):
        code, out = cli(*args)
        assert_clean_cli_failure(code, out, newest.model_id)
        assert len(out.strip().splitlines()) == 1, out
    mgr = mlflow_ckpt.CheckpointManager.resume(run_id, {"model": fresh_model()})
    assert mgr.resumed_from == older
    mgr.close()


def test_newer_format_version_is_refused_with_upgrade_hint(tracking: str) -> None:
    run_id, (ckpt,) = save_run()
    resign(folder(ckpt), edit=_top("format_version", 99))
    model = fresh_model()
    before = params_of(model)
    for call in (
        lambda: mlflow_ckpt.load(ckpt, {"model": model}),
        lambda: mlflow_ckpt.load_training_state(ckpt.uri),
        lambda: mlflow_ckpt.CheckpointManager.resume(run_id, {"model": model}),
    ):
        with pytest.raises(mlflow_ckpt.CheckpointError, match="upgrade mlflow_ckpt") as info:
            call()
        assert ckpt.model_id in str(info.value) and "99" in str(info.value)
    assert_untouched(model, before)
    assert mlflow.active_run() is None  # resume did not reopen the run
    # not "corrupt": it stays listed for a newer mlflow_ckpt
    assert [c.model_id for c in mlflow_ckpt.list_checkpoints(run_id)] == [ckpt.model_id]
    for args in (["show", ckpt.uri], ["verify", ckpt.uri], ["verify", run_id]):
        code, out = cli(*args)
        assert_clean_cli_failure(code, out, "upgrade mlflow_ckpt")

"""Our ``.ztensors`` codec (byte planes in C + zstd + our framing) against python-blosc2.

Should the compressed format be blosc2 (SIMD shuffle or bitshuffle + zstd, its own threads
and frame) instead of our kernel and framing? Both run on the same data: a small
transformer trained a few steps with AdamW, so its optimizer moments are real, giving
four sets of tensors: fp32 weights, the same weights in bf16, ``exp_avg`` and
``exp_avg_sq``. For each: compression ratio, compress and decode GB/s (of raw bytes, the
best of ``--repeats`` runs: this machine's timings swing), with the same zstd level (our
level 1 is blosc2's clevel 1, which blosc2 maps to zstd level 1) and as many threads as
our codec uses. Then code size, and what each decoder does with damaged input: random
byte changes and truncations of a frame, each decoded in a child process so a crash or a
hang is seen as one (the checkpoint's hash normally refuses such a file before any decoder
sees it: this is the second line of defence).

    python benchmarks/blosc2_eval.py [--layers 6] [--width 512] [--repeats 3] [--mutations 200]

Needs ``pip install blosc2`` (not a dependency of the package).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path.cwd()))  # the checkout under test (its mlflow_ckpt)

import blosc2
import numpy as np
import torch

from mlflow_ckpt.codec import planes, zstd_io
from mlflow_ckpt.errors import CheckpointCorruptedError

ROOT = Path(__file__).resolve().parent.parent
OUR_FILES = ("_planes.c", "planes.py", "zstd_io.py")
CHUNK = zstd_io.BLOCK_BYTES


def trained_state(layers: int, width: int) -> dict[str, list[torch.Tensor]]:
    """The four sets of tensors of a small transformer after a few AdamW steps."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(width, 8, 4 * width, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(5):
        x = torch.randn(8, 64, width)
        loss = (model(x) - x.roll(1, dims=1)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    params = [p.detach().contiguous() for p in model.parameters()]
    moments = [opt.state[p] for p in model.parameters()]
    return {
        "fp32 weights": params,
        "bf16 weights": [p.to(torch.bfloat16) for p in params],
        "AdamW exp_avg": [m["exp_avg"].contiguous() for m in moments],
        "AdamW exp_avg_sq": [m["exp_avg_sq"].contiguous() for m in moments],
    }


def best(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def ours(tensors: list[torch.Tensor], level: int, repeats: int) -> dict[str, float]:
    items = [(f"t{i}", t) for i, t in enumerate(tensors)]
    out = io.BytesIO()
    zstd_io.write(out, items, level=level)
    buffer = torch.frombuffer(bytearray(out.getvalue()), dtype=torch.uint8)
    decoded, _ = zstd_io.read_buffer(buffer, "eval.ztensors", "eval")
    assert all(torch.equal(decoded[n].view(torch.uint8), t.view(torch.uint8)) for n, t in items)
    return {
        "stored": len(out.getvalue()),
        "compress": best(lambda: zstd_io.write(io.BytesIO(), items, level=level), repeats),
        "decode": best(lambda: zstd_io.read_buffer(buffer, "eval.ztensors", "eval"), repeats),
    }


def blosc_params(typesize: int, level: int, shuffle: blosc2.Filter) -> blosc2.CParams:
    return blosc2.CParams(
        codec=blosc2.Codec.ZSTD,
        clevel=level,
        filters=[shuffle],
        typesize=typesize,
        nthreads=planes.workers(),
    )


def blosc_frames(
    tensors: list[torch.Tensor], level: int, shuffle: blosc2.Filter
) -> list[tuple[bytes, int]]:
    """Each tensor as one blosc2 frame (chunks of our block size), with its raw size."""
    frames = []
    for t in tensors:
        raw = t.reshape(-1).view(torch.uint8).numpy()
        params = blosc_params(t.element_size(), level, shuffle)
        frames.append(
            (blosc2.SChunk(chunksize=CHUNK, data=raw, cparams=params).to_cframe(), raw.size)
        )
    return frames


def blosc_decode(frames: list[tuple[bytes, int]]) -> list[np.ndarray]:
    out = []
    for frame, size in frames:
        chunk = blosc2.schunk_from_cframe(frame, copy=False)
        chunk.dparams = blosc2.DParams(nthreads=planes.workers())
        dest = np.empty(size, np.uint8)
        chunk.get_slice(0, size, dest)
        out.append(dest)
    return out


def blosc(
    tensors: list[torch.Tensor], level: int, shuffle: blosc2.Filter, repeats: int
) -> dict[str, float]:
    frames = blosc_frames(tensors, level, shuffle)
    decoded = blosc_decode(frames)
    assert all(
        np.array_equal(d, t.reshape(-1).view(torch.uint8).numpy())
        for d, t in zip(decoded, tensors, strict=True)
    )
    return {
        "stored": sum(len(f) for f, _ in frames),
        "compress": best(lambda: blosc_frames(tensors, level, shuffle), repeats),
        "decode": best(lambda: blosc_decode(frames), repeats),
    }


def speed_table(state: dict[str, list[torch.Tensor]], level: int, repeats: int) -> None:
    print(f"zstd level {level}, {planes.workers()} threads, best of {repeats}")
    print(f"{'data':<18} {'codec':<22} {'MB':>7} {'ratio':>6} {'comp GB/s':>9} {'dec GB/s':>8}")
    for label, tensors in state.items():
        raw = sum(t.numel() * t.element_size() for t in tensors)
        rows = {
            "ours (planes+zstd)": ours(tensors, level, repeats),
            "blosc2 shuffle+zstd": blosc(tensors, level, blosc2.Filter.SHUFFLE, repeats),
            "blosc2 bitshuffle+zstd": blosc(tensors, level, blosc2.Filter.BITSHUFFLE, repeats),
        }
        for codec, r in rows.items():
            print(
                f"{label:<18} {codec:<22} {raw / 1e6:7.1f} {raw / r['stored']:6.3f} "
                f"{raw / r['compress'] / 1e9:9.2f} {raw / r['decode'] / 1e9:8.2f}"
            )


def code_size() -> None:
    codec = ROOT / "mlflow_ckpt" / "codec"
    lines = {name: len((codec / name).read_text().splitlines()) for name in OUR_FILES}
    print(f"ours: {sum(lines.values())} lines ({', '.join(f'{k} {v}' for k, v in lines.items())})")
    site = Path(blosc2.__file__).parent
    size = sum(p.stat().st_size for p in site.rglob("*") if p.is_file())
    print(
        f"blosc2 {blosc2.__version__}: {size / 1e6:.1f} MB installed, requires "
        f"{', '.join(blosc2_requires())}"
    )


def blosc2_requires() -> list[str]:
    from importlib.metadata import requires

    return sorted(
        {
            r.split(";")[0].split(">")[0].split("=")[0].strip()
            for r in requires("blosc2") or []
            if "extra" not in r
        }
    )


# ------------------------------------------------------------ damaged input, in children


def mutated(data: bytes, rng: random.Random) -> bytes:
    """``data`` with a few random bytes changed, or cut short, or a run of it zeroed."""
    buf = bytearray(data)
    kind = rng.randrange(3)
    if kind == 0:
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
    elif kind == 1:
        del buf[rng.randrange(1, len(buf)) :]
    else:
        start = rng.randrange(len(buf))
        buf[start : start + rng.randint(1, 64)] = bytes(min(64, len(buf) - start))
    return bytes(buf)


def decode_one(kind: str, data: bytes, expected: bytes) -> str:
    """Decode damaged ``data``: 'error' (a clean exception), 'same' (the damage did not
    matter), or 'WRONG' (decoded without complaint to other bytes)."""
    try:
        if kind == "ours":
            buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            got, _ = zstd_io.read_buffer(buffer, "eval.ztensors", "eval")
            value = got["t"].reshape(-1).view(torch.uint8).numpy().tobytes()
        else:
            (value,) = blosc_decode([(data, len(expected))])
            value = value.tobytes()
    except CheckpointCorruptedError:
        return "error"
    except Exception as exc:  # blosc2 raises what it raises: recorded by type
        return "error" if kind != "ours" else f"other {type(exc).__name__}"
    return "same" if value == expected else "WRONG"


def child(kind: str, sample: str, seed: int, count: int, progress: str) -> None:
    """Run mutations ``seed .. seed + count`` of one sample, writing each result as done."""
    data, expected = encoded_sample(kind, sample)
    with open(progress, "a") as log:
        for i in range(seed, seed + count):
            log.write(f"{i} start\n")
            log.flush()
            log.write(f"{i} {decode_one(kind, mutated(data, random.Random(i)), expected)}\n")
            log.flush()


def encoded_sample(kind: str, sample: str) -> tuple[bytes, bytes]:
    """A 2 MiB tensor of real data (weights or moments), encoded by ``kind``."""
    state = trained_state(2, 256)
    tensor = torch.cat([t.reshape(-1) for t in state[sample]])[: 512 * 1024].contiguous()
    raw = tensor.view(torch.uint8).numpy().tobytes()
    if kind == "ours":
        out = io.BytesIO()
        zstd_io.write(out, [("t", tensor)])
        return out.getvalue(), raw
    ((frame, _),) = blosc_frames([tensor], 1, blosc2.Filter.SHUFFLE)
    return frame, raw


def hostile(mutations: int, scratch: Path) -> None:
    print(f"damaged input: {mutations} random mutations of each frame, each decoded once")
    for kind in ("ours", "blosc2"):
        for sample in ("fp32 weights", "AdamW exp_avg_sq"):
            results = run_children(kind, sample, mutations, scratch / f"{kind}-{sample[:4]}.log")
            counts = {r: results.count(r) for r in sorted(set(results))}
            print(f"  {kind:<7} {sample:<17} {json.dumps(counts)}")


def run_children(kind: str, sample: str, mutations: int, log: Path) -> list[str]:
    """Every mutation's result; a child that dies or hangs marks its mutation 'CRASH' or
    'HANG' and the next child goes on after it."""
    log.unlink(missing_ok=True)
    results: dict[int, str] = {}
    start = 0
    while start < mutations:
        try:
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    kind,
                    sample,
                    str(start),
                    str(mutations - start),
                    str(log),
                ],
                timeout=120,
                capture_output=True,
            )
            failed = "CRASH" if done.returncode else None
        except subprocess.TimeoutExpired:
            failed = "HANG"
        last = None
        for line in log.read_text().splitlines():
            index, result = line.split(" ", 1)
            last = int(index)
            if result != "start":
                results[last] = result
        if last is None:
            raise RuntimeError(f"the child decoded nothing: {done.stderr.decode()[-2000:]}")
        if last not in results:
            results[last] = failed or "CRASH"
        start = last + 1
    return [results[i] for i in range(mutations)]


def main(argv: list[str]) -> None:
    if argv[:1] == ["--child"]:
        child(argv[1], argv[2], int(argv[3]), int(argv[4]), argv[5])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--mutations", type=int, default=200)
    parser.add_argument("--scratch", type=Path, default=Path("/tmp"))
    args = parser.parse_args(argv)
    print(
        f"blosc2 {blosc2.__version__} (c-blosc2 {blosc2.VERSION_STRING}), "
        f"torch {torch.__version__}, our C planes kernel: {planes.NATIVE}"
    )
    state = trained_state(args.layers, args.width)
    for level in args.levels:
        speed_table(state, level, args.repeats)
    code_size()
    hostile(args.mutations, args.scratch)


if __name__ == "__main__":
    main(sys.argv[1:])

"""One benchmark suite: every speed, memory and MLflow-cost figure, on the same state, in one run.

For a model + AdamW state (``--params`` million parameters, ~12 bytes each), measured in
this process against a fresh sqlite tracking store with local artifacts. The disk here swings
~3x between runs minutes apart, so every comparison is timed in interleaved pairs (A B, B A,
..., ``benchmarks/pairs.py``) with a training step (every weight and moment changes) before
each timed call, and reported as the median of the per-pair ratios with their min-max:

- **async stall** (what ``save()`` blocks) against the memcpy floor (the state's tensors
  copied into memory allocated beforehand) and ``dcp.async_save``'s own stall;
- **sync save** (hash, write, fsync, commit, delete the previous checkpoint) against
  ``dcp.save`` (its ``FileSystemWriter`` fsyncs each file by default, ``sync_files=True``;
  also with ``sync_files=False``; it too deletes its previous checkpoint), ``torch.save`` +
  ``mlflow.log_artifact`` (the usual recipe), and alone ``mlflow.pytorch.log_model`` (once:
  it is slow) and ``safetensors.torch.save_file``;
- **load / resume** (``mlflow_ckpt.load`` into the live objects, every file hashed) against
  ``safetensors.torch.load_file`` of the same tensors copied into the live state, and
  ``dcp.load``;
- **load + first AdamW step**: a resume is over once training runs at full speed again,
  so the first optimizer step after each load counts too (plain and compressed): into the
  live objects (a rollback), and into a new model and optimizer built just before (the
  usual resume: the optimizer has no moments yet, so they need new memory either way);
- **compression** (``compression="zstd"``): a sync save and a load of the same state, and
  stored/raw ratio with compress and decompress GB/s for bf16 and fp32 weights and AdamW
  moments (in memory, no disk);
- **peak extra memory** of async saves (a fresh process, ``benchmarks/stall.py --memory``);
- **MLflow cost per checkpoint**: a sync save of a tiny state in a run that already holds
  0 / 1,000 / 10,000 committed checkpoints, and 0 / 200,000 metric points; and the catalog
  queries (``list_checkpoints``, ``latest_checkpoint``, ``best_checkpoint`` by run and by
  experiment, ``mlflow-ckpt list``) on those runs.

    python benchmarks/suite.py [--params 50] [--repeats 5] [--json] [--quick]

``--repeats``: pairs per comparison. ``--quick``: 1,000 checkpoints at most and 3 pairs (a
few minutes). Each comparison's line also goes to stderr as soon as it is measured.
docs/performance.md quotes the current figures, with the machine and date the run prints
(history is in git).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlflow
import torch
import torch.distributed.checkpoint as dcp
from mlflow import MlflowClient
from pairs import PairResult, interleaved
from safetensors.torch import load_file, save_file
from stall import build, state_bytes, touch

import mlflow_ckpt
from tests.records import committed_record

Figures = dict[str, list[float]]


def timed(fn: Callable[[], object], repeats: int, before: Callable[[], object] | None = None):
    out = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def _flat(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    flat = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, entry in opt.state_dict()["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value) and value.dim() > 0:
                flat[f"opt.{i}.{key}"] = value
    return flat


class Pairs:
    """Every comparison of the suite, timed in interleaved pairs (``benchmarks/pairs.py``).

    Each figure keeps the times of the first comparison it took part in (or of its own
    timing loop, when it is compared with nothing); each comparison keeps its per-pair
    ratios, which are the evidence on this machine's noisy disk.
    """

    def __init__(self, pairs: int) -> None:
        self.pairs = pairs
        self.times: Figures = {}
        self.results: list[tuple[str, str, PairResult]] = []

    def single(
        self, name: str, fn: Callable[[], object], before: Callable[[], object] | None = None
    ):
        self.times[name] = timed(fn, self.pairs, before)

    def compare(
        self,
        a_name: str,
        a: Callable[[], object],
        b_name: str,
        b: Callable[[], object],
        setup: Callable[[], object] | None = None,
    ) -> None:
        result = interleaved(a, b, pairs=self.pairs, setup=setup)
        self.times.setdefault(a_name, list(result.a_times))
        self.times.setdefault(b_name, list(result.b_times))
        self.results.append((a_name, b_name, result))
        print(f"  {a_name} / {b_name}: {result.describe()}", file=sys.stderr, flush=True)


SYNC = "mlflow_ckpt sync save"
DCP = "dcp.save (sync_files=True, its default: fsyncs each file)"
DCP_NOSYNC = "dcp.save, sync_files=False"
RECIPE = "torch.save + log_artifact"
FLOOR = "memcpy floor (preallocated)"
LOAD = "mlflow_ckpt load (resume), every file hashed"
STEP = "mlflow_ckpt load + first AdamW step"
NEW = "... into a new model and optimizer"
ZSTD = ", compression='zstd'"


def speed(params: int, pairs: int, work: Path) -> tuple[Pairs, int]:
    """Stall, save and load figures on one model + AdamW state, every comparison in pairs."""
    torch.manual_seed(0)
    model, opt = build(params)
    size = state_bytes(model, opt)
    state = {"model": model, "optimizer": opt}
    flat = _flat(model, opt)
    bench = Pairs(pairs)
    step = iter(range(10**6))
    pending: list[Callable[[], object]] = []  # background work a stall measurement left

    targets = [torch.empty_like(t) for t in flat.values()]
    sources = list(flat.values())

    def memcpy() -> None:
        for target, source in zip(targets, sources, strict=True):
            target.copy_(source)

    def train() -> None:  # untimed, before every timed call: what training does in between
        while pending:
            pending.pop()()
        touch(model, opt)

    def recipe() -> None:
        path = work / "checkpoint.pt"
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
        mlflow.log_artifact(str(path), artifact_path=f"checkpoints/{time.time_ns()}")

    dcp_dirs = iter(range(10**6))

    def dcp_save(sync_files: bool = True) -> Callable[[], None]:
        def save() -> None:  # keeps the previous checkpoint, as keep_last_n=1 does
            target = work / f"dcp-{next(dcp_dirs) % 2}"
            shutil.rmtree(target, ignore_errors=True)
            writer = dcp.FileSystemWriter(str(target), sync_files=sync_files)
            dcp.save(state_dict_for_dcp(model, opt), storage_writer=writer, no_dist=True)

        return save

    def dcp_stall() -> None:
        target = work / "dcp-async"
        shutil.rmtree(target, ignore_errors=True)
        future = dcp.async_save(
            state_dict_for_dcp(model, opt), checkpoint_id=str(target), no_dist=True
        )
        pending.append(future.result)  # finished (untimed) before the next timed call

    with mlflow.start_run(run_name="async"):
        mgr = mlflow_ckpt.CheckpointManager(state, async_save=True, keep_last_n=1, timeline=False)

        def stall() -> None:
            mgr.save(next(step))
            pending.append(mgr.wait)  # finished (untimed) before the next timed call

        bench.compare("mlflow_ckpt async: stall", stall, FLOOR, memcpy, train)
        bench.compare("dcp.async_save: stall", dcp_stall, FLOOR, memcpy, train)
        bench.compare("mlflow_ckpt async: stall", stall, "dcp.async_save: stall", dcp_stall, train)
        train()
        mgr.close()
    targets.clear()
    # Two managers at once, each on its own run (the zstd one nested), so that the plain and
    # the compressed save can be timed in pairs too.
    with mlflow.start_run(run_name="sync") as run:
        mgr = mlflow_ckpt.CheckpointManager(state, async_save=False, keep_last_n=1, timeline=False)
        with mlflow.start_run(run_name="zstd", nested=True) as zrun:
            zmgr = mlflow_ckpt.CheckpointManager(
                state, async_save=False, keep_last_n=1, timeline=False, compression="zstd"
            )
            sync = lambda: mgr.save(next(step))  # noqa: E731
            bench.compare(SYNC, sync, DCP, dcp_save(), train)
            bench.compare(SYNC, sync, DCP_NOSYNC, dcp_save(sync_files=False), train)
            bench.compare(SYNC, sync, RECIPE, recipe, train)  # (its files go to the zstd run)
            bench.compare(SYNC + ZSTD, lambda: zmgr.save(next(step)), SYNC, sync, train)
            zuri = mlflow_ckpt.latest_checkpoint(zrun.info.run_id).uri
            zmgr.close()
        uri = mlflow_ckpt.latest_checkpoint(run.info.run_id).uri
        mgr.close()
    example = torch.randn(2, model[0].in_features).numpy()
    with mlflow.start_run(run_name="log_model"):
        bench.times["mlflow.pytorch.log_model"] = timed(
            lambda: mlflow.pytorch.log_model(model, name="model", input_example=example), 1
        )
    st_path = str(work / "st.safetensors")
    bench.single("safetensors save_file", lambda: save_file(flat, st_path))
    dcp_dir = work / "dcp-load"
    dcp.save(state_dict_for_dcp(model, opt), checkpoint_id=str(dcp_dir), no_dist=True)

    def st_load() -> None:  # the same bytes back into the live model and optimizer
        with torch.no_grad():
            for name, tensor in load_file(st_path).items():
                flat[name].copy_(tensor)

    def dcp_load() -> None:
        dcp.load(state_dict_for_dcp(model, opt), checkpoint_id=str(dcp_dir), no_dist=True)

    load = lambda: mlflow_ckpt.load(uri, state)  # noqa: E731
    bench.compare(LOAD, load, "dcp.load", dcp_load)
    bench.compare(LOAD, load, "safetensors load_file + copy into the state", st_load)
    bench.compare(LOAD.split(",")[0] + ZSTD, lambda: mlflow_ckpt.load(zuri, state), LOAD, load)

    def load_and_step(target: str) -> Callable[[], None]:
        def run() -> None:  # (the gradients of build()'s backward pass are still there)
            mlflow_ckpt.load(target, state)
            opt.step()

        return run

    bench.compare(STEP + ZSTD, load_and_step(zuri), STEP, load_and_step(uri))
    new: dict[str, Any] = {}

    def new_objects() -> None:  # what a resuming process builds before it loads
        new.clear()
        net = torch.nn.Sequential(*(torch.nn.Linear(m.in_features, m.out_features) for m in model))
        net(torch.randn(2, net[0].in_features)).sum().backward()
        new.update(model=net, optimizer=torch.optim.AdamW(net.parameters(), lr=1e-4))

    def resume_and_step(target: str) -> Callable[[], None]:
        def run() -> None:
            mlflow_ckpt.load(target, new)
            new["optimizer"].step()

        return run

    bench.compare(NEW + ZSTD, resume_and_step(zuri), NEW, resume_and_step(uri), new_objects)
    new.clear()
    bench.single("AdamW step (steady)", opt.step)
    return bench, size


class _Counter:
    """A write-only sink that only counts: compression speed without the disk."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: Any) -> int:
        self.size += memoryview(data).nbytes
        return memoryview(data).nbytes


def compression(repeats: int) -> dict[str, tuple[float, list[float], list[float]]]:
    """Stored/raw ratio, compress and decompress GB/s of ``zstd_io`` on typical tensors."""
    from mlflow_ckpt.codec import zstd_io

    torch.manual_seed(0)
    n = 32 * 1024 * 1024
    kinds = {
        "bf16 weights N(0, 0.02)": (torch.randn(2 * n) * 0.02).to(torch.bfloat16),
        "fp32 weights N(0, 0.02)": torch.randn(n) * 0.02,
        "AdamW exp_avg (fp32)": torch.randn(n) * 1e-4,
        "AdamW exp_avg_sq (fp32)": (torch.randn(n) * 1e-4) ** 2,
    }
    out = {}
    for name, tensor in kinds.items():
        raw = tensor.numel() * tensor.element_size()
        sink = _Counter()
        zstd_io.write(sink, [("t", tensor)])
        writes = timed(lambda t=tensor: zstd_io.write(_Counter(), [("t", t)]), repeats)
        buffer = _stored(tensor)
        reads = timed(lambda b=buffer: zstd_io.read_buffer(b, "t", "bench"), repeats)
        out[name] = (
            sink.size / raw,
            [raw / 1e9 / w for w in writes],
            [raw / 1e9 / r for r in reads],
        )
    return out


def _stored(tensor: torch.Tensor) -> torch.Tensor:
    import io

    from mlflow_ckpt.codec import zstd_io

    f = io.BytesIO()
    zstd_io.write(f, [("t", tensor)])
    return torch.frombuffer(bytearray(f.getvalue()), dtype=torch.uint8)


def state_dict_for_dcp(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optimizer": osd}


def mlflow_cost(repeats: int, counts: list[int]) -> Figures:
    """A sync save of a tiny state in runs that already hold many checkpoints / metrics."""
    out: Figures = {}
    client = MlflowClient()
    for existing in counts:
        with mlflow.start_run(run_name=f"cost-{existing}") as run:
            exp = run.info.experiment_id
            for s in range(existing):  # committed records, as saves leave them
                loss = random.Random(s).uniform(0.5, 2.0)
                committed_record(client, exp, run.info.run_id, s, loss=loss)
            out[f"save, run with {existing:,} checkpoints"] = _tiny_saves(existing, repeats * 4)
            if existing:
                out.update(_queries(run.info.run_id, exp, existing, repeats))
    with mlflow.start_run(run_name="cost-metrics") as run:
        from mlflow.entities import Metric

        for chunk in range(200):
            batch = [Metric("loss", 1.0, 1, chunk * 1000 + i) for i in range(1000)]
            client.log_batch(run.info.run_id, metrics=batch)
        out["save, run with 200,000 metric points"] = _tiny_saves(200_000, repeats * 4)
    return out


def _queries(run_id: str, exp: str, existing: int, repeats: int) -> Figures:
    """Catalog queries on a run that holds ``existing`` (+ a few) committed checkpoints."""
    from click.testing import CliRunner

    from mlflow_ckpt.cli import main as cli

    listed = mlflow_ckpt.list_checkpoints(run_id)
    assert len(listed) > existing and listed[0].step > listed[-1].step, "not all, or not in order"
    n = f"{existing:,}"
    runner = CliRunner()
    return {
        f"list_checkpoints, run with {n}": timed(
            lambda: mlflow_ckpt.list_checkpoints(run_id), repeats
        ),
        f"latest_checkpoint, run with {n}": timed(
            lambda: mlflow_ckpt.latest_checkpoint(run_id), repeats
        ),
        f"best_checkpoint (run), run with {n}": timed(
            lambda: mlflow_ckpt.best_checkpoint(run_id=run_id, metric="loss"), repeats
        ),
        f"best_checkpoint (experiment), run with {n}": timed(
            lambda: mlflow_ckpt.best_checkpoint(experiment_ids=[exp], metric="loss"), repeats
        ),
        f"mlflow-ckpt list RUN, run with {n}": timed(
            lambda: runner.invoke(cli, ["list", run_id], catch_exceptions=False), repeats
        ),
    }


def _tiny_saves(first_step: int, n: int) -> list[float]:
    mgr = mlflow_ckpt.CheckpointManager(
        {"w": torch.zeros(16)}, save_every_n_steps=1, async_save=False, timeline=False
    )
    times: list[float] = []
    for s in range(first_step, first_step + n):
        start = time.perf_counter()
        mgr.step(s, metrics={"loss": 1.0})
        times.append(time.perf_counter() - start)
    mgr.close()
    return times


def peak_memory(params: int) -> str:
    proc = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).with_name("stall.py")),
            "--memory",
            "--params",
            str(params),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout.strip().splitlines()[-1]


def table(
    bench: Pairs,
    size: int,
    costs: Figures,
    memory: str,
    zstd: dict[str, tuple[float, list[float], list[float]]],
) -> str:
    def fmt(values: list[float], unit: float = 1.0, digits: int = 3) -> str:
        vs = [v * unit for v in values]
        return f"{min(vs):.{digits}f} / {statistics.median(vs):.{digits}f} / {max(vs):.{digits}f}"

    against: dict[str, list[str]] = {}
    for a_name, b_name, result in bench.results:
        against.setdefault(a_name, []).append(
            f"{result.median_ratio:.2f}x ({result.min:.2f}-{result.max:.2f}) {b_name}"
        )
    lines = [
        f"state: {size / 1e6:.0f} MB (model + AdamW); {platform.node()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, mlflow {mlflow.__version__}, "
        f"{date.today().isoformat()}; every comparison timed in {bench.pairs} interleaved "
        "pairs (A B, B A, ...) after one untimed call of each; a ratio is the median of the "
        "per-pair ratios (min-max in brackets), the seconds are each figure's times in its "
        "first comparison",
        "",
        "| figure | seconds (min / median / max) | ratios: median of pairs (min-max) |",
        "|---|---|---|",
    ]
    for name, values in bench.times.items():
        text = "; ".join(against.get(name, ()))
        lines.append(f"| {name} | {fmt(values)} | {text} |")
    lines += [
        "",
        f"peak memory: {memory}",
        "",
        "| MLflow cost per checkpoint, and queries | ms (min / median / max) |",
        "|---|---|",
    ]
    for name, values in costs.items():
        lines.append(f"| {name} | {fmt(values, 1e3, 1)} |")
    lines += [
        "",
        "| compression='zstd', level 1 | stored / raw | compress GB/s | decompress GB/s |",
        "|---|---|---|---|",
    ]
    for name, (ratio, up, down) in zstd.items():
        lines.append(f"| {name} | {ratio:.3f} | {fmt(up, 1, 2)} | {fmt(down, 1, 2)} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=50, help="millions of parameters")
    parser.add_argument(
        "--repeats", type=int, default=5, help="pairs per comparison (and repeats of the rest)"
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-cost", action="store_true", help="only the speed figures")
    args = parser.parse_args(argv)
    pairs = 3 if args.quick else args.repeats
    counts = [0, 1000] if args.quick else [0, 1000, 10_000]
    work = Path(tempfile.mkdtemp(prefix="mlflow-ckpt-suite-"))
    cwd = os.getcwd()
    os.chdir(work)
    try:
        mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
        mlflow.set_experiment("suite")
        bench, size = speed(args.params, pairs, work)
        costs = {} if args.skip_cost else mlflow_cost(pairs, counts)
        zstd = compression(pairs)
    finally:
        os.chdir(cwd)
        shutil.rmtree(work, ignore_errors=True)
    memory = peak_memory(args.params)
    if args.json:
        print(
            json.dumps(
                {
                    "state_bytes": size,
                    "speed": bench.times,
                    "pairs": [
                        {"a": a, "b": b, **result.as_json()} for a, b, result in bench.results
                    ],
                    "mlflow_cost": costs,
                    "memory": memory,
                    "compression": zstd,
                }
            )
        )
    else:
        print(table(bench, size, costs, memory, zstd))


if __name__ == "__main__":
    main(sys.argv[1:])

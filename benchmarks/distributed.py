"""Distributed saves: how long training is blocked, bytes per rank, rank 0's peak memory.

A model of a few hundred MB (AdamW state included) is sharded with FSDP2 on 1 and 2 ranks
(``torchrun``, gloo, CPU) and saved by, in the same run:

- **mlflow_ckpt sync** and **mlflow_ckpt async**: ``CheckpointManager.step`` on a due step
  (every rank; the job waits for the slowest), keep_last_n=1;
- **the usual recipe**: the full state dict gathered to rank 0
  (``full_state_dict=True, cpu_offload=True``), ``torch.save`` + ``mlflow.log_artifact``;
- **dcp.save**: ``torch.distributed.checkpoint.save`` with its ``FileSystemWriter``.

Blocked time is the max over ranks of the call's wall time. The disk here swings ~3x
between runs minutes apart, so the methods run in rounds (every method once, back to back;
the order rotates from round to round, after one untimed warm-up call of each), and a ratio
is the median of the per-round ratios with their min-max (``benchmarks/pairs.py``). Before
every timed call, a training step (forward, backward, ``opt.step()``) changes every weight
and moment, so an incremental save writes them all, as in training.
Peak memory is rank 0's resident memory above what it held before the call, sampled every
2 ms (with glibc's mmap threshold fixed at 1 MiB, so freed buffers leave the resident set).
``dcp.save`` runs with its ``FileSystemWriter`` defaults (``sync_files=True``: it fsyncs).

    python benchmarks/distributed.py [--state-mb 300] [--ranks 1 2] [--repeats 3] [--json]

``BENCH_NONFINITE=save`` turns the NaN/inf guard off (``nonfinite="save"``), to see what it
costs; ``BENCH_VERIFY=hash`` re-reads every file after the save.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parent.parent

from pairs import PairResult  # noqa: E402


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Resident memory above the level at entry, sampled every 2 ms (the peak)."""

    def __enter__(self) -> PeakMemory:
        self.base = _rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def extra(self) -> int:
        return self.peak - self.base


RECIPE = "usual recipe (gather to rank 0 + torch.save + log_artifact)"
DCP = "dcp.save (FileSystemWriter, sync_files=True: fsyncs)"


def worker(args: argparse.Namespace) -> None:
    import mlflow
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import mlflow_ckpt

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    width = 1024
    layers = max(1, round(args.state_mb * 1e6 / 3 / 4 / (width * width)))  # params + 2 moments
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    model = fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(4, width)).sum().backward()
    opt.step()
    state_bytes = sum(p.numel() * 4 * 3 for p in model.parameters())  # global, fp32 + moments
    work = Path(args.workdir)
    results: dict[str, list[tuple[float, int]]] = {}

    def train() -> None:  # untimed, before every timed call: every weight and moment moves
        model(torch.randn(4, width)).sum().backward()
        opt.step()
        opt.zero_grad()

    def measure(name: str, fn: Callable[[], None], after: Callable[[], None] | None) -> None:
        train()
        dist.barrier()
        with PeakMemory() as memory:
            started = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - started  # what training waits for
            if after is not None:
                after()  # an async save finishing in the background (not timed)
        times = [None] * world
        dist.all_gather_object(times, elapsed)
        results.setdefault(name, []).append((max(times), memory.extra))

    def recipe() -> None:
        msd, osd = get_state_dict(
            model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if rank == 0:
            path = work / f"recipe-{world}.pt"
            torch.save({"model": msd, "optimizer": osd}, path)
            mlflow.log_artifact(str(path), f"checkpoints/{time.time_ns()}")
        dist.barrier()

    if rank == 0:
        mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
        experiment = mlflow.create_experiment(f"dist-{world}", str(work / f"artifacts-{world}"))
        mlflow.set_experiment(experiment_id=experiment)
    state = {"model": model, "optimizer": opt}
    dcp_calls = iter(range(10**6))

    def dcp_save() -> None:
        msd, osd = get_state_dict(model, opt)  # the same state, sharded
        dcp.save(  # (overwrites the checkpoint before last, as keep_last_n=1 deletes it)
            {"model": msd, "optimizer": osd},
            storage_writer=dcp.FileSystemWriter(str(work / f"dcp-{world}-{next(dcp_calls) % 2}")),
        )

    managers = {}
    for mode in ("sync", "async"):  # both open at once (async in a nested run): interleaved
        if rank == 0:
            mlflow.start_run(run_name=f"{mode}-{world}", nested=mode == "async")
        managers[mode] = mlflow_ckpt.CheckpointManager(
            state,
            save_every_n_steps=1,
            keep_last_n=1,
            async_save=mode == "async",
            save_last=False,
            timeline=False,
            nonfinite=os.environ.get("BENCH_NONFINITE", "skip"),
            verify=os.environ.get("BENCH_VERIFY", "size"),
        )
    steps = iter(range(10**6))
    methods: dict[str, tuple[Callable[[], None], Callable[[], None] | None]] = {
        "mlflow_ckpt sync": (lambda: managers["sync"].step(next(steps)), None),
        "mlflow_ckpt async": (lambda: managers["async"].step(next(steps)), managers["async"].wait),
        RECIPE: (recipe, None),
        DCP: (dcp_save, None),
    }
    for name, (fn, after) in methods.items():  # warm-up, untimed
        measure(name, fn, after)
    results.clear()
    order = list(methods)
    for i in range(args.repeats):  # rounds, the order rotating: every method at every place
        for name in order[i % len(order) :] + order[: i % len(order)]:
            measure(name, *methods[name])
    for mode in ("async", "sync"):
        managers[mode].close()
        if rank == 0:
            mlflow.end_run()

    written = 0
    if rank == 0:
        ckpt = mlflow_ckpt.list_checkpoints(
            mlflow.search_runs(filter_string=f"attributes.run_name = 'async-{world}'").run_id[0]
        )[0]
        folder = Path(ckpt.artifact_location)
        per_rank = {}
        for r in range(world):
            files = [*folder.glob(f"shards/rank-{r:05d}-*"), *folder.glob(f"ranks/{r:05d}/*")]
            per_rank[r] = sum(p.stat().st_size for p in files)
        written = max(per_rank.values())
        report = {
            "world": world,
            "state_bytes": state_bytes,
            "max_bytes_per_rank": written,
            "results": results,
        }
        Path(args.out).write_text(json.dumps(report))
    dist.destroy_process_group()


def launch(args: argparse.Namespace) -> list[dict]:
    reports = []
    for world in args.ranks:
        with tempfile.TemporaryDirectory(prefix="mlflow-ckpt-dist-bench-") as tmp:
            out = Path(tmp) / "report.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            cmd += [f"--nproc_per_node={world}", __file__, "--worker", "--workdir", tmp]
            cmd += ["--out", str(out), "--state-mb", str(args.state_mb)]
            cmd += ["--repeats", str(args.repeats)]
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
            # Large blocks always come from mmap and go back to the OS when freed, so the
            # resident size tracks live memory (else glibc keeps freed copies resident and a
            # second copy of the state would not show).
            env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
            subprocess.run(cmd, check=True, env=env, cwd=tmp)
            reports.append(json.loads(out.read_text()))
    return reports


def table(reports: list[dict]) -> str:
    """Per method: blocked time, and its ratio to the recipe and to ``dcp.save`` as the median
    of the per-round ratios (min-max): one round runs every method once, back to back."""
    lines = [
        "| ranks | method | blocked s (min / median) | vs usual recipe | vs dcp.save "
        "| rank 0 peak extra MB |",
        "|---|---|---|---|---|---|",
    ]
    for report in reports:
        res = report["results"]
        times = {k: tuple(t for t, _ in v) for k, v in res.items()}
        for name, values in times.items():
            peak = max(m for _, m in res[name]) / 1e6
            recipe = PairResult(values, times[RECIPE])
            against_dcp = PairResult(values, times[DCP])
            lines.append(
                f"| {report['world']} | {name} | {min(values):.3f} / "
                f"{statistics.median(values):.3f} | {_ratio(recipe)} | {_ratio(against_dcp)} "
                f"| {peak:.0f} |"
            )
        shard = report["state_bytes"] / report["world"] / 1e6
        lines.append(
            f"| {report['world']} | (state {report['state_bytes'] / 1e6:.0f} MB; one rank's "
            f"shard {shard:.0f} MB; most bytes written by one rank "
            f"{report['max_bytes_per_rank'] / 1e6:.0f} MB; {len(times[DCP])} rounds) | | | | |"
        )
    return "\n".join(lines)


def _ratio(result: PairResult) -> str:
    return f"{result.median_ratio:.2f}x ({result.min:.2f}-{result.max:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--state-mb", type=int, default=300)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    reports = launch(args)
    print(json.dumps(reports, indent=1) if args.json else table(reports))


if __name__ == "__main__":
    main()

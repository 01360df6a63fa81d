"""How long does a checkpoint block training, and how much extra memory does it take?

For a ~50M-parameter model with AdamW state (~600 MB), measured in one process, each
variant in its own MLflow run against a fresh sqlite store with local artifacts:

* mlflow_ckpt async (the time ``save()`` blocks: the in-memory snapshot; min/median/max)
  and sync, and the floor for the snapshot: a plain copy of the state's tensors into memory
  allocated beforehand;
* the usual recipe: ``torch.save`` of model + optimizer, then ``mlflow.log_artifact``;
* ``mlflow.pytorch.log_model`` (weights only, and it still takes longer).

The state does not change between these saves, so the managers run with
``incremental=False``: in training every weight changes and an incremental save writes it
all; here it would only reference the previous bytes. Prints absolute times and ratios
against the usual recipe, each the median of interleaved pairs (``benchmarks/pairs.py``)
with its min-max, and the peak resident memory an
async save adds to the process, as a multiple of the state's size.

    python benchmarks/stall.py [--params 50] [--repeats 3]

``--archive SECONDS`` measures instead the stall of async saves while old milestones are
archived (``keep_every_n_steps=2, archive_after_n=1`` on the local store: each archive
recompresses a whole milestone), with SECONDS of "training" (a sleep) between saves, long
enough for a save's own write but not for the archive after it. Before archiving became a
job of its own, each such save waited for the archive.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow
import torch

import mlflow_ckpt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pairs import PairResult, interleaved


def build(params_millions: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    width = 2048
    layers = max(1, round(params_millions * 1e6 / (width * width + width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, width)).sum().backward()
    opt.step()  # materialise exp_avg / exp_avg_sq
    return model, opt


def touch(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """What happens between two saves in training: every weight and moment changes in
    place (an incremental save then writes them all, as it would for real)."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *(v for s in opt.state.values() for v in s.values())]:
            if tensor.is_floating_point() and tensor.dim() > 0:
                tensor.add_(1e-7)


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for entry in opt.state.values():
        total += sum(t.numel() * t.element_size() for t in entry.values() if torch.is_tensor(t))
    return total


def rss_kb(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=50, help="millions of parameters")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--archive", type=float, metavar="SECONDS", help="see the docstring")
    args = parser.parse_args(argv)
    if args.memory:
        measure_memory(args.params)
        return
    if args.archive is not None:
        measure_archive_stall(args.params, args.repeats, args.archive)
        return
    torch.manual_seed(0)
    model, opt = build(args.params)
    nparams = sum(p.numel() for p in model.parameters())
    size = state_bytes(model, opt)
    print(f"model: {nparams / 1e6:.1f}M parameters; model + AdamW state {size / 1e6:.0f} MB")
    print(f"torch {torch.__version__}, mlflow {mlflow.__version__}, {os.cpu_count()} CPUs")

    work = Path(tempfile.mkdtemp(prefix="mlflow-ckpt-bench-"))
    cwd = os.getcwd()
    os.chdir(work)
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    mlflow.set_experiment("stall-benchmark")
    state = {"model": model, "optimizer": opt}
    step = iter(range(10**6))
    pending: list[Callable[[], None]] = []  # an async save still finishing (untimed)
    totals: list[float] = []

    def settle() -> None:  # untimed, before every timed call
        while pending:
            pending.pop()()

    # The floor: a plain copy of the state's tensors into memory allocated beforehand.
    sources = [p.detach() for p in model.parameters()]
    sources += [t for entry in opt.state.values() for t in entry.values() if torch.is_tensor(t)]
    targets = [torch.empty_like(t) for t in sources]

    def memcpy() -> None:
        for target, source in zip(targets, sources, strict=True):
            target.copy_(source)

    def recipe() -> None:
        path = work / "checkpoint.pt"
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
        mlflow.log_artifact(str(path), artifact_path=f"checkpoints/{time.time_ns()}")

    # Every comparison in interleaved pairs (benchmarks/pairs.py): the disk here swings ~3x
    # between runs minutes apart, so only ratios within a pair are evidence.
    compared: dict[str, PairResult] = {}
    with mlflow.start_run(run_name="async"):
        amgr = mlflow_ckpt.CheckpointManager(state, incremental=False, async_save=True)

        def stall() -> None:  # what save() blocks is the snapshot; the rest is background
            start = time.perf_counter()
            amgr.save(next(step))
            pending.append(lambda: (amgr.wait(), totals.append(time.perf_counter() - start)))

        with mlflow.start_run(run_name="sync", nested=True):
            smgr = mlflow_ckpt.CheckpointManager(state, incremental=False, async_save=False)
            pairs = args.repeats
            compared["async stall / memcpy floor"] = interleaved(
                stall, memcpy, pairs=pairs, setup=settle
            )
            compared["async stall / usual recipe"] = interleaved(
                stall, recipe, pairs=pairs, setup=settle
            )
            compared["sync save / usual recipe"] = interleaved(
                lambda: smgr.save(next(step)), recipe, pairs=pairs, setup=settle
            )
            settle()
            smgr.close()
        amgr.close()
    targets.clear()
    example = torch.randn(2, model[0].in_features).numpy()  # 3.17's default pt2 format needs one
    with mlflow.start_run(run_name="mlflow.pytorch.log_model"):
        log_model = timed(
            lambda: mlflow.pytorch.log_model(model, name="model", input_example=example), 1
        )[0]

    stalls = compared["async stall / memcpy floor"].a_times
    print(
        f"\n{'comparison (interleaved pairs)':<32} {'median ratio (min-max)':>24}  A / B median s"
    )
    for name, result in compared.items():
        print(
            f"{name:<32} {result.median_ratio:>10.3f}x ({result.min:.3f}-{result.max:.3f})  "
            f"{statistics.median(result.a_times):.3f} / {statistics.median(result.b_times):.3f}"
        )
    print(f"async save until committed: median {statistics.median(totals):.3f} s")
    print(f"mlflow.pytorch.log_model (once): {log_model:.3f} s")
    ratio = compared["async stall / usual recipe"].median_ratio
    verdict = "meets" if ratio <= 0.1 else "MISSES"
    print(f"\nasync stall / usual recipe = {ratio:.3f} ({verdict} the <= 0.1x target)")
    to_floor = compared["async stall / memcpy floor"].median_ratio
    verdict = "meets" if to_floor <= 2 else "MISSES"
    spread = (
        f"min {min(stalls):.3f} / median {statistics.median(stalls):.3f} / max {max(stalls):.3f} s"
    )
    print(f"async stall over {len(stalls)} saves: {spread}")
    print(f"async stall / memcpy = {to_floor:.2f}x ({verdict} the <= 2x target)")
    os.chdir(cwd)
    shutil.rmtree(work, ignore_errors=True)  # several GB of checkpoints
    # Memory in a fresh process: freed snapshot buffers that the allocator keeps would
    # otherwise hide in this process's baseline.
    subprocess.run([sys.executable, __file__, "--memory", "--params", str(args.params)], check=True)


def measure_archive_stall(params_millions: int, repeats: int, between: float) -> None:
    """Stalls of async saves that follow a save whose retention archived a milestone."""
    torch.manual_seed(0)
    model, opt = build(params_millions)
    state = {"model": model, "optimizer": opt}
    print(f"model + AdamW state {state_bytes(model, opt) / 1e6:.0f} MB; {between} s between saves")
    work = Path(tempfile.mkdtemp(prefix="mlflow-ckpt-bench-"))
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    mlflow.set_experiment("archive-stall")
    stalls = []
    with mlflow.start_run(run_name="archive"):
        mgr = mlflow_ckpt.CheckpointManager(
            state, keep_last_n=1, keep_every_n_steps=2, archive_after_n=1, timeline=False
        )
        for step in range(3 + 2 * repeats):  # milestones: 1, 3, ...; archived after 2, 4, ...
            touch(model, opt)
            start = time.perf_counter()
            mgr.save(step)
            if step >= 3 and step % 2 == 1:  # the save after one that archived a milestone
                stalls.append(time.perf_counter() - start)
            time.sleep(between)
        start = time.perf_counter()
        mgr.close()
        closing = time.perf_counter() - start
        tiers = [c.tier for c in mlflow_ckpt.list_checkpoints(mgr.run_id)]
    shutil.rmtree(work, ignore_errors=True)
    print(
        f"stall of a save after an archive: min {min(stalls):.3f} / median "
        f"{statistics.median(stalls):.3f} / max {max(stalls):.3f} s over {len(stalls)} saves"
    )
    print(f"close(): {closing:.3f} s; tiers at the end: {tiers}")


def measure_memory(params_millions: int) -> None:
    """Peak resident memory that async saves add over the training process's own."""
    torch.manual_seed(0)
    model, opt = build(params_millions)
    size = state_bytes(model, opt)
    work = Path(tempfile.mkdtemp(prefix="mlflow-ckpt-bench-mem-"))
    cwd = os.getcwd()
    os.chdir(work)
    try:
        _measure_memory(model, opt, size, work)
    finally:
        os.chdir(cwd)
        shutil.rmtree(work, ignore_errors=True)


def _measure_memory(
    model: torch.nn.Module, opt: torch.optim.Optimizer, size: int, work: Path
) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    mlflow.set_experiment("memory-benchmark")
    with mlflow.start_run(run_name="async-memory"):
        mgr = mlflow_ckpt.CheckpointManager({"model": model, "optimizer": opt}, incremental=False)
        baseline = rss_kb()
        if not reset_peak_rss():
            print("peak memory: /proc/self/clear_refs is not writable here; not measured")
            return
        for step in range(3):
            mgr.save(step)
            mgr.wait()
        peak = rss_kb("VmHWM")
        mgr.close()
    extra = (peak - baseline) * 1024
    ratio = extra / size
    verdict = "meets" if ratio <= 1.1 else "MISSES"
    print(
        f"peak extra resident memory over 3 async saves (fresh process): {extra / 1e6:.0f} MB "
        f"= {ratio:.2f}x the {size / 1e6:.0f} MB state ({verdict} the <= 1.1x target)"
    )


if __name__ == "__main__":
    main(sys.argv[1:])

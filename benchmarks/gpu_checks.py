"""What only a GPU can show: CUDA state resumes bit-for-bit, and how long a save blocks.

Run on a machine with CUDA (CI has none; this is a manual check):

1. **Bit-for-bit resume on CUDA.** A model with dropout trains on the GPU (CUDA random
   stream, AdamW state on the GPU) for 2N steps straight, and again as N steps, a save,
   everything scrambled (weights, optimizer, CUDA and CPU random streams), ``resume`` and N
   more steps. The two final states must be equal bit for bit (deterministic algorithms on).
2. **How long a save blocks training**, for a model + AdamW state living on the GPU: the
   async snapshot (pinned host buffers, non-blocking copies, one synchronize) against a
   whole sync save, ``torch.save`` + ``mlflow.log_artifact``, and
   ``torch.distributed.checkpoint.save`` (single process), all to local disk (each keeps
   only its newest checkpoint, as a long run would). The state does not change between
   these saves, so they run with ``incremental=False`` (in training every weight changes).

    python benchmarks/gpu_checks.py [--params 300] [--repeats 3] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlflow
import torch

import mlflow_ckpt


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 256),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.3),
        torch.nn.Linear(256, 8),
    ).cuda()


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range, mgr=None) -> None:
    for step in steps:
        x = torch.randn(32, 64, device="cuda")  # the CUDA random stream feeds data and dropout
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if mgr is not None:
            mgr.step(step, {"loss": loss.item()})


def check_cuda_resume(steps: int = 40) -> dict[str, object]:
    torch.use_deterministic_algorithms(True)
    torch.cuda.manual_seed_all(0)
    straight = _net(0)
    ref_opt = torch.optim.AdamW(straight.parameters(), lr=1e-2)
    _train(straight, ref_opt, range(steps))
    ref_rng = torch.cuda.get_rng_state()

    torch.cuda.manual_seed_all(0)
    model = _net(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with mlflow.start_run(run_name="cuda-resume") as run:
        mgr = mlflow_ckpt.CheckpointManager(
            {"model": model, "optimizer": opt}, save_every_n_steps=steps // 2, save_last=False
        )
        _train(model, opt, range(steps // 2), mgr)
        mgr.close()
    # A "new process": other weights, fresh optimizer, scrambled random streams.
    torch.cuda.manual_seed_all(12345)
    torch.manual_seed(999)
    model = _net(7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mgr = mlflow_ckpt.CheckpointManager.resume(
        run.info.run_id, {"model": model, "optimizer": opt}, save_every_n_steps=steps // 2
    )
    _train(model, opt, range(mgr.start_step, steps), mgr)
    mgr.close()
    mlflow.end_run()
    torch.use_deterministic_algorithms(False)
    pairs = zip(straight.state_dict().values(), model.state_dict().values(), strict=True)
    weights_equal = all(torch.equal(a, b) for a, b in pairs)
    moments_equal = all(
        torch.equal(opt.state[p][key], ref_opt.state[q][key])
        for p, q in zip(model.parameters(), straight.parameters(), strict=True)
        for key in ("exp_avg", "exp_avg_sq", "step")
    )
    return {
        "resumed_at_step": steps // 2,
        "weights_bitwise_equal": weights_equal,
        "adamw_state_bitwise_equal": moments_equal,
        "optimizer_state_on": str(next(iter(opt.state.values()))["exp_avg"].device),
        "cuda_rng_equal": torch.equal(torch.cuda.get_rng_state(), ref_rng),
    }


def _build(params_millions: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, int]:
    width = 4096
    layers = max(1, round(params_millions * 1e6 / (width * width + width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, width, device="cuda")).sum().backward()
    opt.step()
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters()) * 3
    return model, opt, nbytes


def _timed(fn: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_stall(params_millions: int, repeats: int, workdir: Path) -> dict[str, object]:
    import torch.distributed.checkpoint as dcp

    model, opt, nbytes = _build(params_millions)
    state = {"model": model, "optimizer": opt}
    results: dict[str, object] = {"state_gb": nbytes / 1e9}
    with mlflow.start_run(run_name="cuda-stall-async"):
        mgr = mlflow_ckpt.CheckpointManager(
            state, incremental=False, async_save=True, save_last=False, keep_last_n=1
        )
        step = iter(range(10**6))
        blocked = []
        for _ in range(repeats):
            s = next(step)
            torch.cuda.synchronize()
            start = time.perf_counter()
            mgr.save(s)
            blocked.append(time.perf_counter() - start)
            mgr.wait()
        mgr.close()
    results["mlflow_ckpt_async_blocks_s"] = statistics.median(blocked)
    with mlflow.start_run(run_name="cuda-stall-sync"):
        mgr = mlflow_ckpt.CheckpointManager(
            state, incremental=False, async_save=False, save_last=False, keep_last_n=1
        )
        step = iter(range(10**6))
        results["mlflow_ckpt_sync_s"] = _timed(lambda: mgr.save(next(step)), repeats)
        mgr.close()

    # The same sync save with shards written one at a time (what parallel_writes buys).
    from mlflow_ckpt.storage.local import LocalStore

    parallel = LocalStore.parallel_writes
    LocalStore.parallel_writes = property(lambda self: 1)  # type: ignore[method-assign]
    try:
        with mlflow.start_run(run_name="cuda-stall-sync-serial"):
            mgr = mlflow_ckpt.CheckpointManager(
                state, incremental=False, async_save=False, save_last=False, keep_last_n=1
            )
            step = iter(range(10**6))
            results["mlflow_ckpt_sync_serial_s"] = _timed(lambda: mgr.save(next(step)), repeats)
            mgr.close()
    finally:
        LocalStore.parallel_writes = parallel  # type: ignore[method-assign]

    def torch_save() -> None:
        path = workdir / "ckpt.pt"
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
        mlflow.log_artifact(str(path))

    with mlflow.start_run(run_name="cuda-stall-torch-save"):
        results["torch_save_log_artifact_s"] = _timed(torch_save, repeats)

    def dcp_save() -> None:
        dcp.save(
            {"model": model.state_dict(), "optimizer": opt.state_dict()},
            checkpoint_id=str(workdir / "dcp"),  # overwritten: disk is finite
        )

    results["dcp_save_s"] = _timed(dcp_save, repeats)
    base = results["torch_save_log_artifact_s"]
    for key in (
        "mlflow_ckpt_async_blocks_s",
        "mlflow_ckpt_sync_s",
        "mlflow_ckpt_sync_serial_s",
        "dcp_save_s",
    ):
        results[key.removesuffix("_s") + "_vs_torch_save"] = results[key] / base
    results["mlflow_ckpt_sync_vs_dcp"] = results["mlflow_ckpt_sync_s"] / results["dcp_save_s"]
    return results


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=300, help="millions of parameters")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu_checks.py needs a CUDA device")
    workdir = Path(tempfile.mkdtemp(prefix="mlflow-ckpt-cuda-"))
    mlflow.set_tracking_uri(f"sqlite:///{workdir}/mlflow.db")
    mlflow.set_experiment("cuda")
    try:
        report = {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "resume": check_cuda_resume(),
            "stall": bench_stall(args.params, args.repeats, workdir),
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)
    resume = report["resume"]
    if not (resume["weights_bitwise_equal"] and resume["adamw_state_bitwise_equal"]):
        sys.exit("CUDA resume was not bit-for-bit")


if __name__ == "__main__":
    main(sys.argv[1:])

"""A 2-rank job whose run is taken over by another process between two saves (torchrun).

For each save mode (sync, async) it starts a run, saves step 0 on every rank, then rank 0
writes the lease as a process that forced a takeover would (``--other-pid``: a live PID
that is not this job's). Every rank then goes on training with ``on_error="warn"`` and
records what its next two saves and ``close()`` did. Used by tests/test_distributed_lease.py.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import mlflow
import torch
import torch.distributed as dist
from mlflow import MlflowClient

import mlflow_ckpt
from mlflow_ckpt.errors import CheckpointError
from mlflow_ckpt.manager.lease import LeaseInfo, write_lease


def _attempt(call) -> dict[str, str | None]:  # type: ignore[no-untyped-def]
    """What one manager call did: the error type it raised (if any) and its warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            call()
            raised, message = None, None
        except CheckpointError as exc:
            raised, message = type(exc).__name__, str(exc)
    warned = [str(w.message) for w in caught if "Training goes on" in str(w.message)]
    return {"raised": raised, "message": message, "warned": "; ".join(warned) or None}


def run_mode(async_save: bool, other_pid: int, rank: int) -> dict[str, object]:
    torch.manual_seed(rank)
    state = {"model": torch.nn.Linear(8, 8)}
    run_id = None
    if rank == 0:
        run_id = mlflow.start_run(
            run_name=f"takeover-{'async' if async_save else 'sync'}"
        ).info.run_id
    mgr = mlflow_ckpt.CheckpointManager(
        state, save_every_n_steps=1, async_save=async_save, on_error="warn"
    )
    mgr.step(0)
    mgr.wait()
    if rank == 0:
        client = MlflowClient()
        experiment_id = client.get_run(run_id).info.experiment_id
        taker = LeaseInfo("operator-forced", os.uname().nodename, other_pid, time.time(), 60.0)
        write_lease(client, run_id, experiment_id, taker)
    dist.barrier()
    record: dict[str, object] = {"run_id": run_id}
    record["step1"] = _attempt(lambda: (mgr.step(1), mgr.wait()))
    record["step2"] = _attempt(lambda: (mgr.step(2), mgr.wait()))
    record["close"] = _attempt(mgr.close)
    if rank == 0:
        mlflow.end_run()
    return record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--other-pid", type=int, required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    report = {
        "sync": run_mode(False, args.other_pid, rank),
        "async": run_mode(True, args.other_pid, rank),
    }
    (args.out / f"rank-{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""A small but complete training loop, run in child processes by the resume tests.

Dropout, a data stream with its own torch.Generator, draws from Python's ``random`` and
NumPy's global stream, AdamW and a OneCycle schedule: everything that must continue exactly
for a resumed run to end bit-for-bit where an uninterrupted one does.

    python -m tests.train_script MODE --steps N --out FILE [--run-file F] [--stop-after S]

MODE is ``straight`` (fresh run, all steps), ``first`` (fresh run; ``os._exit`` right after
the checkpoint of step S committed), ``resume`` (resume the run in --run-file and finish) or
``auto`` (``resume="auto"``: the job's run, keyed by ``MLFLOW_CKPT_RUN_KEY``, started or
continued: the same command line every time). ``auto`` prints ``run ID``, ``resumed at S``
and ``step S`` after each recorded step, for a test to time its kills and signals by.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import torch

import mlflow_ckpt

DIM = 8


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(DIM, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(32, 3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def build(total_steps: int) -> dict[str, object]:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-2, total_steps=total_steps)
    data = torch.Generator().manual_seed(1234)
    return {"model": model, "optimizer": opt, "scheduler": sched, "data": data}


def train_steps(
    state: dict,
    manager: mlflow_ckpt.CheckpointManager | None,
    start: int,
    stop: int,
    steps_per_epoch: int,
    stop_after: int | None = None,
    pace: argparse.Namespace | None = None,
) -> None:
    model, opt, sched, data = state["model"], state["optimizer"], state["scheduler"], state["data"]
    model.train()
    for step in range(start, stop):
        if pace is not None:
            time.sleep(pace.sleep)
            if "ballast" in state:  # changed every step: each save writes all of it
                state["ballast"].add_(1.0)
        x = torch.randn(16, DIM, generator=data)
        y = torch.randint(0, 3, (16,), generator=data)
        x = x * (1.0 + 0.1 * random.random()) + float(np.random.normal(0, 0.01))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        epoch = step // steps_per_epoch
        metrics = {"train_loss": loss.item(), "val_loss": 1.0 / (1 + step % 7)}
        if manager is not None:
            manager.step(step, metrics, epoch=epoch, end_of_epoch=(step + 1) % steps_per_epoch == 0)
            if stop_after is not None and step == stop_after:
                manager.wait()
                os._exit(0)  # die without closing anything, like a preempted job
        if pace is not None:
            _paced(step, pace)


def _paced(step: int, pace: argparse.Namespace) -> None:
    """``auto`` mode: report the step; signal ourselves or stall where the test asks."""
    print(f"step {step}", flush=True)
    if pace.signal_self_at == step:  # lands while this step's async save is in flight
        os.kill(os.getpid(), signal.SIGTERM)
    if pace.stall_after == step:  # no step() comes any more (a hang, or a long eval)
        time.sleep(600)


def dump(state: dict, path: Path) -> None:
    torch.save(
        {
            "model": state["model"].state_dict(),
            "optimizer": state["optimizer"].state_dict(),
            "lr": state["scheduler"].get_last_lr(),
            "python": random.random(),
            "numpy": float(np.random.random()),
            "torch": torch.rand(3),
        },
        path,
    )


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["straight", "first", "resume", "auto"])
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--run-file", type=Path)
    p.add_argument("--stop-after", type=int)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--format", default="safetensors")
    p.add_argument("--sync", action="store_true")
    p.add_argument("--sleep", type=float, default=0.0, help="auto: seconds per step")
    p.add_argument("--lease-ttl", type=float, default=60.0)
    p.add_argument("--grace", type=float, default=60.0, help="auto: preempt_grace_s")
    p.add_argument("--go-file", type=Path, help="auto: wait for it before opening the run")
    p.add_argument("--signal-self-at", type=int, help="auto: SIGTERM itself after this step")
    p.add_argument("--stall-after", type=int, help="auto: stop calling step() after it")
    p.add_argument("--ballast-mb", type=int, default=0, help="auto: extra state to write")
    args = p.parse_args(argv)
    random.seed(7)
    np.random.seed(7)
    state = build(args.steps)
    opts = dict(save_every_n_steps=args.every, format=args.format, async_save=not args.sync)
    if args.mode == "straight":
        train_steps(state, None, 0, args.steps, steps_per_epoch=10)
    elif args.mode == "first":
        with mlflow.start_run(run_name="bitwise") as run:
            args.run_file.write_text(run.info.run_id)
            manager = mlflow_ckpt.CheckpointManager(state, **opts)
            train_steps(state, manager, 0, args.steps, 10, stop_after=args.stop_after)
            manager.close()
    elif args.mode == "auto":
        if args.ballast_mb:
            state["ballast"] = torch.zeros(args.ballast_mb << 18)
        if args.go_file is not None:  # racing first starts: every process has its tracking
            mlflow.search_runs(max_results=1, output_format="list")  # store open, and waits
            print("waiting", flush=True)
            while not args.go_file.exists():
                time.sleep(0.001)
        manager = mlflow_ckpt.CheckpointManager(
            state, resume="auto", lease_ttl=args.lease_ttl, preempt_grace_s=args.grace, **opts
        )
        print(f"run {manager.run_id}", flush=True)
        print(f"resumed at {manager.start_step}", flush=True)
        train_steps(state, manager, manager.start_step, args.steps, 10, pace=args)
        manager.close()
        mlflow.end_run()
    else:
        run_id = args.run_file.read_text().strip()
        manager = mlflow_ckpt.CheckpointManager.resume(run_id, state, **opts)
        print(f"resumed at {manager.start_step}", flush=True)
        train_steps(state, manager, manager.start_step, args.steps, 10)
        manager.close()
        mlflow.end_run()
    dump(state, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])

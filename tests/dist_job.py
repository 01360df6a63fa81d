"""A small distributed training job for the tests, run under ``torchrun`` (gloo, CPU).

Every rank runs the same code, as a user's script would. What each rank ends with (its full
model and optimizer state, start step, counters) goes to ``--out`` for the test to compare.

    torchrun --standalone --nproc_per_node 2 tests/dist_job.py --strategy fsdp2 --steps 4 \
        --save-every 2 --out OUT [--resume RUN_ID] [--die-after STEP] [--fail-rank R ...]
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlflow

import mlflow_ckpt
from mlflow_ckpt.codec import dcp_store


def build_model() -> torch.nn.Module:
    """Layer sizes not divisible by 2 or 3: shards are uneven on 2 and 3 ranks."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(7, 11), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(11, 5)
    )


class Cursor:
    """A per-rank data position (and, with ``bad_step``, a state that cannot be written)."""

    def __init__(self, rank: int, bad_step: int | None = None) -> None:
        self.position = 0
        self.rank = rank
        self.bad_step = bad_step

    def state_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"position": self.position, "rank": self.rank}
        if self.bad_step is not None and self.position == self.bad_step + 1:
            out["bad"] = torch.zeros(2, dtype=torch.complex128)  # safetensors refuses it
        return out

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.position = int(state["position"])  # type: ignore[arg-type]
        self.rank = int(state["rank"])  # type: ignore[arg-type]


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(6, 7, generator=g), torch.randn(6, 5, generator=g)


def full_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The full (gathered) model and optimizer state, flat, for the test to compare."""
    msd, osd = get_state_dict(
        model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    flat = {f"model/{k}": v.detach().clone() for k, v in msd.items()}
    for fqn, values in osd.get("state", {}).items():
        for key, v in values.items():
            flat[f"optimizer/{fqn}/{key}"] = torch.as_tensor(v).detach().clone().reshape(-1)
    return {k: v.contiguous() for k, v in flat.items()}


def kill_when_writing(folder: Path) -> None:
    """SIGKILL this rank as soon as a shard file of a new checkpoint appears."""

    before = set(folder.glob("**/models/*/artifacts/shards/*"))

    def watch() -> None:
        while True:
            if set(folder.glob("**/models/*/artifacts/shards/*")) - before:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.001)

    threading.Thread(target=watch, daemon=True).start()


def init_process_group() -> None:
    """The default group, on a store prefixed by the restart attempt under torchrun.

    torchrun's agent keeps one TCPStore for all restarts of its workers, and torch 2.13's
    env:// init reuses its keys: a restarted attempt then reads the dead attempt's gloo
    addresses ("Gloo connectFullMesh failed ... Connection refused", or a hang) in about
    half the restarts. A prefix per attempt gives every attempt keys of its own (groups made
    later by ``new_group``, the manager's included, inherit it).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group("gloo")
        return
    agent = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False
    )
    store = dist.PrefixStore(f"attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", agent)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)


def _first_attempt_target(spec: str | None, rank: int) -> int | None:
    """The step of a ``RANK:STEP`` fault meant for this rank, on the first attempt only."""
    if spec is None or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    target, step = (int(part) for part in spec.split(":"))
    return step if target == rank else None


def main() -> None:
    # A rank that aborts (SIGABRT from C++, SIGSEGV) prints every thread's Python stack, so
    # a rare crash in CI shows where it happened (seen once: "terminate called without an
    # active exception" on the failing rank of test_a_rank_failing_mid_save_commits_nothing).
    faulthandler.enable(all_threads=True)
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=["fsdp2", "ddp", "plain"], default="fsdp2")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume")
    parser.add_argument("--die-after", type=int)
    parser.add_argument("--fail-rank", type=int)
    parser.add_argument("--fail-step", type=int)
    parser.add_argument("--kill-rank", type=int)
    parser.add_argument("--kill-step", type=int)
    parser.add_argument("--kill-after", type=float, help="seconds into training (--kill-rank)")
    parser.add_argument("--keep-last", type=int)
    parser.add_argument("--keep-every", type=int, help="milestones: kept forever, self-contained")
    parser.add_argument("--async-save", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the wrapped model")
    parser.add_argument("--on-error", default="raise")
    parser.add_argument("--artifact-root")
    parser.add_argument("--compression", help='"zstd": compressed chunks and rank files')
    parser.add_argument("--freeze-first", action="store_true", help="a frozen first layer")
    parser.add_argument("--break-resume-rank", type=int, help="a bug in reading, on this rank")
    parser.add_argument("--auto", action="store_true", help='resume="auto" (key: torchrun\'s)')
    parser.add_argument("--first-attempt-kill", help="RANK:STEP: SIGKILL it (attempt 0 only)")
    parser.add_argument("--first-attempt-sigterm", help="RANK:STEP: SIGTERM it (attempt 0)")
    parser.add_argument("--step-sleep", type=float, default=0.0, help="seconds per step")
    args = parser.parse_args()

    init_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model()
    if args.freeze_first:  # its chunks never change: incremental saves reference them
        model[0].requires_grad_(False)
    torch.manual_seed(1234 + rank)  # per-rank dropout streams
    if args.strategy == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in (model[0], model[3]):
            fully_shard(layer, mesh=mesh)
        model = fully_shard(model, mesh=mesh)
    elif args.strategy == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    if args.compile:
        model = torch.compile(model, backend="eager")  # the wrapper, without a C++ toolchain
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    bad_step = args.fail_step if args.fail_rank == rank else None
    cursor = Cursor(rank, bad_step)
    state = {"model": model, "optimizer": opt, "scheduler": sched, "data": cursor}

    clients = []
    original_init = mlflow.MlflowClient.__init__

    def counting_init(self: mlflow.MlflowClient, *a: object, **k: object) -> None:
        clients.append(1)
        original_init(self, *a, **k)

    mlflow.MlflowClient.__init__ = counting_init  # type: ignore[method-assign]

    options = {
        "save_every_n_steps": args.save_every,
        "async_save": args.async_save,
        "keep_last_n": args.keep_last,
        "keep_every_n_steps": args.keep_every,
        "on_error": args.on_error,
        "model_factory": "tests.dist_job:build_model",
        "timeline": False,
        "compression": args.compression,
    }
    if args.break_resume_rank == rank:  # a programming error, not a damaged checkpoint
        from mlflow_ckpt.manager import distributed_resume

        def broken(*a: object, **k: object) -> None:
            raise AttributeError("injected bug in read_rank")

        distributed_resume.read_rank = broken  # type: ignore[assignment]
    groups_before = len(c10d._world.pg_map)  # (torch has no public list of groups)
    if args.auto:  # the job's own run (rank 0 finds or starts it); the same on a restart
        mgr = mlflow_ckpt.CheckpointManager(state, resume="auto", **options)
    elif args.resume:
        mgr = mlflow_ckpt.CheckpointManager.resume(args.resume, state, **options)
    else:
        if rank == 0:
            if args.artifact_root:
                name = f"dist-{time.time_ns()}"
                mlflow.set_experiment(
                    experiment_id=mlflow.create_experiment(name, args.artifact_root)
                )
            mlflow.start_run()
        mgr = mlflow_ckpt.CheckpointManager(state, **options)
    if args.kill_rank == rank and args.kill_step is not None and args.kill_step == 0:
        kill_when_writing(Path.cwd())
    if args.kill_rank == rank and args.kill_after is not None:
        timer = threading.Timer(args.kill_after, os.kill, (os.getpid(), signal.SIGKILL))
        timer.daemon = True
        timer.start()
    hashed: list[int] = []  # elements hashed by the chunk writer (frozen: first save only)
    real_hash = dcp_store.hash_tensor

    def counting_hash(tensor: torch.Tensor) -> str:
        hashed.append(tensor.numel())
        return real_hash(tensor)

    dcp_store.hash_tensor = counting_hash  # type: ignore[assignment]
    errors: list[str] = []
    saved_full: dict[int, dict[str, torch.Tensor]] = {}
    hashed_per_save: list[int] = []
    saved_models: list[str] = []
    kill_at = _first_attempt_target(args.first_attempt_kill, rank)
    sigterm_at = _first_attempt_target(args.first_attempt_sigterm, rank)
    for step in range(mgr.start_step, args.steps):
        if kill_at == step:
            os.kill(os.getpid(), signal.SIGKILL)  # mid-run: torchrun restarts every rank
        if rank == 0 and step == mgr.start_step + 2:
            print("training", flush=True)
        time.sleep(args.step_sleep)
        if args.kill_rank == rank and args.kill_step == step:
            kill_when_writing(Path.cwd())
        model.train()
        x, y = batch(rank, step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        cursor.position = step + 1
        due = (step + 1) % args.save_every == 0
        if due:
            saved_full[step] = full_state(model, opt)  # collective: on every rank
        try:
            mgr.step(step, metrics={"loss": loss.item(), "rank_loss": float(rank)})
            if args.async_save:
                mgr.wait()
            if due and mgr.last_checkpoint is not None:
                hashed_per_save.append(sum(hashed))
                hashed.clear()
                saved_models.append(mgr.last_checkpoint.model_id)
        except mlflow_ckpt.CheckpointError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            break
        if args.die_after == step:
            os.kill(os.getpid(), signal.SIGKILL)
        if sigterm_at == step:  # this rank alone is preempted: all save the next step
            os.kill(os.getpid(), signal.SIGTERM)
    try:
        mgr.close()
    except mlflow_ckpt.CheckpointError as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
    groups_left = len(c10d._world.pg_map) - groups_before  # the manager's, after close
    final = full_state(model, opt)
    args.out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        save_file(final, str(args.out / "final.safetensors"))
        for step, flat in saved_full.items():
            save_file(flat, str(args.out / f"saved-{step}.safetensors"))
    local = {
        k: (v.to_local() if hasattr(v, "to_local") else v).detach().clone().contiguous()
        for k, v in model.state_dict().items()
    }
    save_file(local, str(args.out / f"local-{rank}.safetensors"))
    report = {
        "rank": rank,
        "attempt": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
        "world": world,
        "run_id": mgr.run_id,
        "start_step": mgr.start_step,
        "position": cursor.position,
        "cursor_rank": cursor.rank,
        "lr": opt.param_groups[0]["lr"],
        "scheduler_epoch": sched.last_epoch,
        "errors": errors,
        "clients": len(clients),
        "last": mgr.last_checkpoint.uri if mgr.last_checkpoint else None,
        "rng": torch.rand(1).item(),
        "hashed_per_save": hashed_per_save,
        "last_shared": (
            list(mgr.last_checkpoint.shared)
            if mgr.last_checkpoint and isinstance(mgr.last_checkpoint.shared, tuple)
            else None
        ),
        "saved_models": saved_models,
        "groups_left": groups_left,
        "frozen_local_numel": sum(
            (p.to_local() if hasattr(p, "to_local") else p).numel()
            for p in model.parameters()
            if not p.requires_grad
        ),
    }
    (args.out / f"rank-{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

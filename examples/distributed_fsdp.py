"""Distributed checkpoints: train with FSDP2 on 2 ranks, resume on 3, serve in 1 process.

    python examples/distributed_fsdp.py

It launches itself under ``torchrun`` (gloo on CPU, so no GPU is needed):

1. 2 ranks train a small FSDP2 model for 20 steps; ``CheckpointManager`` is built on every
   rank (only rank 0 has an MLflow run) and saves every 5 steps, sharded: each rank writes
   its own shards, rank 0 commits.
2. 3 ranks resume the run: the shards are resharded onto 3 ranks, training goes on to 30.
3. One plain process (no ``torch.distributed``) loads the full state dict of the newest
   checkpoint and serves it through ``mlflow.pyfunc``.

Checkpoints go to MLflow's default ``sqlite:///mlflow.db`` in the current folder.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import torch

import mlflow_ckpt

HERE = Path(__file__).resolve()


def build_model() -> torch.nn.Module:
    """The network (the pyfunc flavor rebuilds it with this factory)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))


def train(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    model = fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = {"model": model, "optimizer": opt}
    options = {
        "save_every_n_steps": 5,
        "keep_last_n": 2,
        # importable by name wherever the checkpoint is served: it carries this file
        "model_factory": "distributed_fsdp:build_model",
        "code_paths": [str(HERE)],
    }
    if args.resume:
        mgr = mlflow_ckpt.CheckpointManager.resume(args.resume, state, **options)
    else:
        if rank == 0:  # only rank 0 needs an MLflow run
            mlflow.set_experiment("distributed-example")
            mlflow.start_run(run_name="fsdp2-example")
        mgr = mlflow_ckpt.CheckpointManager(state, **options)
    if rank == 0:
        print(f"{world} ranks, run {mgr.run_id}, starting at step {mgr.start_step}", flush=True)
    g = torch.Generator().manual_seed(100 + rank)
    for step in range(mgr.start_step, args.steps):
        x = torch.randn(32, 20, generator=g)
        loss = torch.nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long())
        opt.zero_grad()
        loss.backward()
        opt.step()
        mgr.step(step, metrics={"loss": loss.item()})  # on every rank; rank 0 logs
    mgr.close()
    if rank == 0:
        (Path.cwd() / "distributed-example-run.txt").write_text(mgr.run_id)
        print(f"{world} ranks: trained to step {args.steps - 1}", flush=True)
    dist.destroy_process_group()


def torchrun(nproc: int, *args: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    subprocess.run([*cmd, f"--nproc_per_node={nproc}", str(HERE), *args], check=True, env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--resume")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if args.worker:
        train(args)
        return
    torchrun(2, "--worker", "--steps", "20")
    run_id = (Path.cwd() / "distributed-example-run.txt").read_text()
    torchrun(3, "--worker", "--steps", "30", "--resume", run_id)
    newest = mlflow_ckpt.latest_checkpoint(run_id)
    assert newest is not None
    steps = [c.step for c in mlflow_ckpt.list_checkpoints(run_id)]
    print(f"checkpoints of run {run_id}: steps {steps}")
    full = mlflow_ckpt.load_training_state(newest.uri)["model"]
    shapes = {name: list(t.shape) for name, t in full.items()}
    print(f"plain process: full state dict of step {newest.step}: {shapes}")
    predictions = mlflow.pyfunc.load_model(newest.uri).predict(torch.randn(4, 20).numpy())
    print(f"plain process: pyfunc predicted {predictions.shape} for 4 samples")
    experiment_id = mlflow.get_run(run_id).info.experiment_id
    print("Look at them in the MLflow UI: mlflow ui --backend-store-uri sqlite:///mlflow.db")
    print(
        f"   http://127.0.0.1:5000/#/experiments/{experiment_id}/models"
        "?workflowType=machine_learning  (the Models tab: one row per checkpoint)"
    )


if __name__ == "__main__":
    main()

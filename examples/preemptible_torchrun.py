"""A preemptible distributed job: ``torchrun --max-restarts`` restarts it, and it goes on.

    python examples/preemptible_torchrun.py

It launches itself as ``torchrun --standalone --nproc_per_node 2 --max-restarts 2`` (gloo
on CPU, so no GPU is needed). In its first attempt rank 1 is SIGKILLed mid-run, as a node
failure or an OOM kill would; torchrun stops the other rank and starts both again, the same
command, and training continues the same MLflow run from its newest checkpoint. Nothing in
the script knows a run ID: ``resume="auto"`` keys the run by ``TORCHELASTIC_RUN_ID``, which
is the same for every restart of one ``torchrun`` (``--standalone`` draws it; with a
rendezvous of your own, ``--rdzv-id``). SIGTERM (a preemption notice, which torchrun's agent
forwards to every worker) saves the current step before the workers end.

One line matters beyond ``resume="auto"``: the process group is initialized on a store
prefixed by the restart attempt. torchrun's agent keeps one TCPStore for every restart of
its workers, and torch's ``env://`` initialization reuses its keys, so a restarted attempt
can read the dead attempt's addresses and fail with "Gloo connectFullMesh failed ...
Connection refused" (or hang); measured here with torch 2.13 in about half the restarts,
with every rendezvous kind (pytorch/pytorch#167288 reports it with NCCL). The prefix gives
each attempt keys of its own, and every group made later (the checkpoint manager's too)
inherits it.

Checkpoints go to MLflow's default ``sqlite:///mlflow.db`` in the current folder.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import torch
import torch.distributed as dist

import mlflow_ckpt

STEPS = 30


def init_process_group(backend: str = "gloo") -> None:
    """``dist.init_process_group``, on a store of this restart attempt's own under torchrun."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":  # not torchrun's agent store
        dist.init_process_group(backend)
        return
    agent = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False
    )
    store = dist.PrefixStore(f"attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", agent)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group(backend, store=store, rank=rank, world_size=world)


def train() -> None:
    init_process_group()
    rank, attempt = dist.get_rank(), int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(100 + rank)  # each rank's data stream, checkpointed
    if rank == 0:  # only rank 0 talks to MLflow
        mlflow.set_experiment("preemptible-example")
    mgr = mlflow_ckpt.CheckpointManager(
        {"model": model, "optimizer": opt, "data": data},
        resume="auto",  # the job's run, by TORCHELASTIC_RUN_ID: started, or continued
        save_every_n_steps=5,
        keep_last_n=2,
    )
    if rank == 0:
        print(f"attempt {attempt}: run {mgr.run_id}, starting at step {mgr.start_step}", flush=True)
    for step in range(mgr.start_step, STEPS):
        x = torch.randn(32, 20, generator=data)
        loss = torch.nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long())
        opt.zero_grad()
        loss.backward()
        opt.step()
        mgr.step(step, metrics={"loss": loss.item()})  # on every rank
        if attempt == 0 and rank == 1 and step == 17:
            mgr.wait()  # (step 14's checkpoint committed: the output is the same every run)
            os.kill(os.getpid(), signal.SIGKILL)  # a node failure: torchrun restarts the job
    mgr.close()
    if rank == 0:
        steps = [c.step for c in mlflow_ckpt.list_checkpoints(mgr.run_id)]
        print(f"attempt {attempt}: trained to step {STEPS - 1}; checkpoints {steps}", flush=True)
    dist.destroy_process_group()


def main() -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["--max-restarts=2", str(Path(__file__).resolve()), "--worker"]
    print("$ torchrun --standalone --nproc_per_node=2 --max-restarts=2 preemptible_torchrun.py")
    job = subprocess.run(cmd, env=env, capture_output=True, text=True)
    print(job.stdout, end="")
    if job.returncode != 0:
        raise SystemExit(f"torchrun failed ({job.returncode}):\n{job.stderr[-4000:]}")
    print("one MLflow run for the whole job; each restart went on from the newest checkpoint")


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if sys.argv[1:] == ["--worker"]:
        train()
    else:
        main()

"""Fork after a loss spike: go back to the checkpoint pinned before it, lower the learning
rate, and train on as a new run whose charts continue the original curve.

    python examples/fork_after_spike.py

The source run raises its learning rate at step 40 (a warm restart set too high): the
loss jumps, and ``spike_factor`` pins the checkpoint before the jump, which retention
(``keep_last_n=2``) then never deletes. ``mlflow_ckpt.fork`` starts a new run from it,
nested under the source in the MLflow UI, with the source's history up to that step;
the fork restarts with a lower rate. The source run stays as it was.
"""

from __future__ import annotations

from typing import Any

import mlflow
import torch

import mlflow_ckpt

STEPS, RESTART = 80, 40
OPTIONS: dict[str, Any] = dict(
    save_every_n_steps=10, keep_last_n=2, spike_factor=3.0, spike_metric="loss"
)
X = torch.randn(256, 8, generator=torch.Generator().manual_seed(1))
Y = X.sum(1, keepdim=True)


def make_state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    return {"model": model, "optimizer": torch.optim.Adam(model.parameters(), lr=1e-2)}


def train(
    manager: mlflow_ckpt.CheckpointManager, state: dict[str, Any], restart_lr: float
) -> float:
    model, opt = state["model"], state["optimizer"]
    loss = torch.tensor(float("nan"))
    for step in range(manager.start_step, STEPS):
        if step == RESTART:  # the warm restart
            for group in opt.param_groups:
                group["lr"] = restart_lr
        loss = torch.nn.functional.mse_loss(model(X), Y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        manager.step(step, metrics={"loss": loss.item()})
    manager.close()
    return loss.item()


mlflow.set_experiment("mlflow-ckpt-fork")
with mlflow.start_run(run_name="restart-too-high") as run:
    mlflow.log_params({"lr": 1e-2, "restart_lr": 0.5})
    state = make_state()
    source_loss = train(mlflow_ckpt.CheckpointManager(state, **OPTIONS), state, restart_lr=0.5)
kept = mlflow_ckpt.list_checkpoints(run.info.run_id)
print(f"source run {run.info.run_id}: final loss {source_loss:.4f}")
print("  kept checkpoints:", ", ".join(f"step {c.step} ({c.pinned or 'newest'})" for c in kept))

pinned = min((c for c in kept if c.pinned == "pre_spike"), key=lambda c: c.step)  # the first
state = make_state()
manager = mlflow_ckpt.fork(
    pinned, state, run_name="restart-lower", params={"restart_lr": 0.02}, **OPTIONS
)
print(f"forked at step {pinned.step} into run {manager.run_id}; goes on at {manager.start_step}")
fork_loss = train(manager, state, restart_lr=0.02)
mlflow.end_run()  # the fork made its run the active one
print(f"fork run {manager.run_id}: final loss {fork_loss:.4f}")

uri = mlflow.get_tracking_uri()
experiment_id = mlflow.get_experiment_by_name("mlflow-ckpt-fork").experiment_id
print(f"\nSee both in the MLflow UI:  mlflow ui --backend-store-uri {uri}")
print(f"  http://127.0.0.1:5000/#/experiments/{experiment_id}  (the fork is nested under")
print("  the source run; compare their 'loss' charts: the fork's starts with the source's)")

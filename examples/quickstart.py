"""Quickstart: checkpoints as MLflow LoggedModels, resume a run by its ID, load the best one.

    pip install mlflow-ckpt && python quickstart.py

It needs only the installed package, so it runs from any folder. The tracking store is the
one MLflow is given (``MLFLOW_TRACKING_URI``), else MLflow's default: ``./mlflow.db``.
"""

from typing import Any

import mlflow
import torch

import mlflow_ckpt

# Save every 10 steps; keep the 2 newest and the best one by val_loss (the rest is deleted).
OPTIONS: dict[str, Any] = dict(
    save_every_n_steps=10, monitor="val_loss", mode="min", keep_last_n=2, keep_best_n=1
)
X, VAL_X = torch.randn(2, 256, 8, generator=torch.Generator().manual_seed(1))


def make_state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    return {"model": model, "optimizer": torch.optim.Adam(model.parameters(), lr=1e-2)}


def mse(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:  # learn y = sum(x)
    return torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))


def train(manager: mlflow_ckpt.CheckpointManager, state: dict[str, Any], until: int) -> None:
    model, opt = state["model"], state["optimizer"]
    for step in range(manager.start_step, until):  # 0 on a new run, s + 1 after a resume
        loss = mse(model, X)
        opt.zero_grad()
        loss.backward()
        opt.step()
        metrics = {"loss": loss.item()}
        if (step + 1) % 10 == 0:
            with torch.no_grad():
                metrics["val_loss"] = mse(model, VAL_X).item()
        manager.step(step, metrics=metrics)  # logs the metrics, saves when one is due
    manager.close()  # waits for the uploads, applies retention


experiment = mlflow.set_experiment("mlflow-ckpt-quickstart")
with mlflow.start_run(run_name="quickstart") as run:
    state = make_state()
    train(mlflow_ckpt.CheckpointManager(state, **OPTIONS), state, until=30)
print(f"trained steps 0-29 in run {run.info.run_id}")

# Later, in any process: fresh objects and the run ID are all it takes to go on.
state = make_state()
manager = mlflow_ckpt.CheckpointManager.resume(run.info.run_id, state, **OPTIONS)
print(f"resumed: training goes on from step {manager.start_step}")
train(manager, state, until=60)
mlflow.end_run()  # resume reopened the run

for c in mlflow_ckpt.list_checkpoints(run.info.run_id):  # newest first; retention kept these
    print(f"  step {c.step}  val_loss {c.metrics['val_loss']:.4f}  {','.join(c.triggers)}  {c.uri}")
best = mlflow_ckpt.best_checkpoint(run_id=run.info.run_id, metric="val_loss", mode="min")
assert best is not None  # (None: no checkpoint has val_loss)
model = make_state()["model"]
mlflow_ckpt.load(best, {"model": model})  # hashes checked, then restored in place
with torch.no_grad():
    print(f"best: step {best.step}, loaded into a new model: val_loss {mse(model, VAL_X):.4f}")

uri = mlflow.get_tracking_uri()
if uri.startswith("http"):  # a tracking server serves its UI at the same address
    ui = uri
else:
    ui = "http://127.0.0.1:5000"
    print(f"\nSee them in the MLflow UI:  mlflow ui --backend-store-uri {uri}")
models_tab = f"{ui}/#/experiments/{experiment.experiment_id}/models"
print(f"Models tab: {models_tab}?workflowType=machine_learning")

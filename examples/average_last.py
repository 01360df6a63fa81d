"""Average the last checkpoints of a run (LAWA / fairseq's average_checkpoints) and compare.

    python examples/average_last.py

Trains the demo classifier for 300 steps with a checkpoint every 25 into MLflow's default
store (``sqlite:///mlflow.db``, artifacts under ``./mlruns``), averages the weights of the
last 3 checkpoints into a new checkpoint of the same run, evaluates the last checkpoint and
the average on held-out data, and logs each score linked to its checkpoint, so the Models tab
compares them. The average serves like any checkpoint
(``mlflow.pyfunc.load_model(avg.uri)``) but is never resumed from or deleted by the run's
retention.
"""

from __future__ import annotations

import os
import sys

import mlflow
import torch
from mlflow import MlflowClient

import mlflow_ckpt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from demo_model import Classifier, synthetic_batch

TOTAL_STEPS = 300
EXPERIMENT = "mlflow-ckpt-average"


def held_out_loss(model: torch.nn.Module) -> float:
    x, y = synthetic_batch(torch.Generator().manual_seed(123), 4096)
    model.eval()
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(x), y).item()


def train() -> str:
    torch.manual_seed(0)
    model = Classifier()
    # a constant learning rate and small batches: the weights keep jumping around the
    # minimum, which is where averaging the last few helps most
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = torch.Generator().manual_seed(42)
    with mlflow.start_run(run_name="average-last") as run:
        manager = mlflow_ckpt.CheckpointManager(
            {"model": model, "optimizer": opt, "data": data},
            save_every_n_steps=25,
            keep_last_n=5,
            model_factory=Classifier,
            model_kwargs={"features": 20, "hidden": 64, "classes": 4},
            code_paths=[os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_model.py")],
        )
        for step in range(TOTAL_STEPS):
            model.train()
            x, y = synthetic_batch(data, 16)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            manager.step(step, metrics={"train_loss": loss.item()})
        manager.close()
    return run.info.run_id


def main() -> None:
    mlflow.set_experiment(EXPERIMENT)
    run_id = train()
    last3 = mlflow_ckpt.list_checkpoints(run_id)[:3]  # newest first
    avg = mlflow_ckpt.average(last3)
    steps = ", ".join(str(c.step) for c in last3)
    print(f"averaged steps {steps} into {avg.uri} (step {avg.step})")

    client = MlflowClient()
    for label, ckpt in (("last checkpoint", last3[0]), ("average", avg)):
        loss = held_out_loss(mlflow_ckpt.load_model(ckpt.uri))
        # the score linked to its checkpoint: a column of the Models tab
        client.log_metric(run_id, "heldout_loss", loss, step=ckpt.step, model_id=ckpt.model_id)
        print(f"{label:<16} held-out loss {loss:.4f}  {ckpt.uri}")

    kept = [c.step for c in mlflow_ckpt.list_checkpoints(run_id)]
    print(f"\nlist_checkpoints (the resume points) is unchanged: steps {kept}")
    uri = mlflow.get_tracking_uri()
    experiment_id = client.get_run(run_id).info.experiment_id
    print(f"See both in the MLflow UI:  mlflow ui --backend-store-uri {uri}")
    print(
        f"Models tab: http://127.0.0.1:5000/#/experiments/{experiment_id}/models"
        "?workflowType=machine_learning"
    )


if __name__ == "__main__":
    main()

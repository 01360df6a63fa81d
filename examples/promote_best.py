"""Two runs with different learning rates; promote the best checkpoint across them; serve it.

    python examples/promote_best.py

Uses MLflow's default store (``sqlite:///mlflow.db``). Each run keeps only its 2 newest and
2 best checkpoints (retention by MLflow queries). The best checkpoint across both runs by
``val_loss`` is registered as ``demo-classifier@champion`` and served through pyfunc.
"""

from __future__ import annotations

import os
import sys

import mlflow
import numpy as np
import torch

import mlflow_ckpt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from demo_model import Classifier, synthetic_batch

EXPERIMENT = "mlflow-ckpt-promote-demo"
STEPS = 200


def train(lr: float) -> str:
    torch.manual_seed(0)
    model = Classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    data = torch.Generator().manual_seed(1)
    val_x, val_y = synthetic_batch(torch.Generator().manual_seed(7), 512)
    with mlflow.start_run(run_name=f"lr={lr:g}") as run:
        mlflow.log_param("lr", lr)
        with mlflow_ckpt.CheckpointManager(
            {"model": model, "optimizer": opt, "data": data},
            save_every_n_steps=20,
            monitor="val_loss",
            keep_last_n=2,
            keep_best_n=2,
            model_factory=Classifier,
        ) as manager:
            for step in range(STEPS):
                model.train()
                x, y = synthetic_batch(data)
                loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                metrics = {"train_loss": loss.item()}
                if (step + 1) % 20 == 0:
                    model.eval()
                    with torch.no_grad():
                        val = torch.nn.functional.cross_entropy(model(val_x), val_y)
                    metrics["val_loss"] = val.item()
                manager.step(step, metrics)
    kept = mlflow_ckpt.list_checkpoints(run.info.run_id)
    print(f"run lr={lr:g} ({run.info.run_id}): kept checkpoints at steps {[c.step for c in kept]}")
    return run.info.run_id


def main() -> None:
    exp = mlflow.set_experiment(EXPERIMENT)
    for lr in (1e-3, 1e-2):
        train(lr)
    best = mlflow_ckpt.best_checkpoint(
        experiment_ids=[exp.experiment_id], metric="val_loss", mode="min"
    )
    lr = mlflow.get_run(best.run_id).data.params["lr"]
    print(f"best: val_loss {best.metrics['val_loss']:.4f} at step {best.step} of lr={lr} run")
    version = mlflow_ckpt.promote(best, "demo-classifier", alias="champion")
    print(f"promoted to demo-classifier version {version.version} (@champion)")

    served = mlflow.pyfunc.load_model("models:/demo-classifier@champion")
    x, _ = synthetic_batch(torch.Generator().manual_seed(99), 4)
    logits = served.predict(x.numpy())
    print(f"predicted classes for 4 new samples: {np.argmax(logits, axis=1).tolist()}")


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    main()

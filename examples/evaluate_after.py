"""Score every kept checkpoint on a benchmark that did not exist while the model trained.

    python examples/evaluate_after.py

Trains a small classifier with a checkpoint every 20 steps into MLflow's default store
(``sqlite:///mlflow.db``). After the run has finished, a "new" held-out set (the same four
classes, noisier and shifted: data the training never measured) scores each checkpoint:
``mlflow_ckpt.evaluate`` logs the values at each checkpoint's step, linked to its
LoggedModel, so they show as columns in the Models tab and ``best_checkpoint`` ranks by them.
"""

from __future__ import annotations

import os
import sys

import mlflow
import torch

import mlflow_ckpt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from demo_model import Classifier, synthetic_batch

EXPERIMENT = "mlflow-ckpt-evaluate-demo"
STEPS = 100


def train() -> str:
    torch.manual_seed(0)
    model = Classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(1)
    val_x, val_y = synthetic_batch(torch.Generator().manual_seed(7), 512)
    with (
        mlflow.start_run(run_name="train") as run,
        mlflow_ckpt.CheckpointManager(
            {"model": model, "optimizer": opt, "data": data},
            save_every_n_steps=20,  # steps 19, 39, 59, 79, 99; no retention: all are kept
            model_factory=Classifier,  # what lets evaluate() rebuild each checkpoint's network
        ) as manager,
    ):
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
                    metrics["val_loss"] = torch.nn.functional.cross_entropy(
                        model(val_x), val_y
                    ).item()
            manager.step(step, metrics)
    print(f"trained run {run.info.run_id} (now {mlflow.get_run(run.info.run_id).info.status})")
    return run.info.run_id


# The new benchmark: 1,000 samples, twice the noise, the class centers moved.
gen = torch.Generator().manual_seed(2024)
HELD_X, HELD_Y = synthetic_batch(gen, 1000)
HELD_X = HELD_X + torch.randn(HELD_X.shape, generator=gen) + 0.5


def heldout(model: torch.nn.Module) -> dict[str, float]:
    """Called once per checkpoint with its network rebuilt in eval mode, under no_grad."""
    logits = model(HELD_X)
    return {
        "loss": torch.nn.functional.cross_entropy(logits, HELD_Y).item(),
        "accuracy": (logits.argmax(1) == HELD_Y).float().mean().item(),
    }


def main() -> None:
    exp = mlflow.set_experiment(EXPERIMENT)
    run_id = train()

    # name= identifies this evaluation: each checkpoint is tagged mlflow_ckpt.evaluated.<name>
    # once its metrics are logged, so a second call (or a re-run after a failure) skips it.
    for call in ("first", "second"):
        result = mlflow_ckpt.evaluate(run_id, heldout, metric_prefix="heldout/", name="shifted-v1")
        print(f"{call} call: {len(result.evaluated)} evaluated, {len(result.skipped)} skipped")

    print(f"\n{'step':>4}  {'val_loss':>8}  {'heldout/loss':>12}  {'heldout/accuracy':>16}  uri")
    for c in sorted(mlflow_ckpt.list_checkpoints(run_id), key=lambda c: c.step):
        m = c.metrics
        print(
            f"{c.step:>4}  {m['val_loss']:>8.4f}  {m['heldout/loss']:>12.4f}  "
            f"{m['heldout/accuracy']:>16.3f}  {c.uri}"
        )
    by_val = mlflow_ckpt.best_checkpoint(run_id=run_id, metric="val_loss", mode="min")
    best = mlflow_ckpt.best_checkpoint(run_id=run_id, metric="heldout/accuracy", mode="max")
    assert by_val is not None and best is not None
    print(f"\nbest by val_loss: step {by_val.step} ({by_val.metrics['val_loss']:.4f})")
    print(f"best by heldout/accuracy: step {best.step} ({best.metrics['heldout/accuracy']:.3f})")

    uri = mlflow.get_tracking_uri()
    ui = uri if uri.startswith("http") else "http://127.0.0.1:5000"
    if not uri.startswith("http"):
        print(f"\nSee them in the MLflow UI:  mlflow ui --backend-store-uri {uri}")
    print(
        "Models tab (columns heldout/loss, heldout/accuracy beside val_loss): "
        f"{ui}/#/experiments/{exp.experiment_id}/models?workflowType=machine_learning"
    )
    print("In the run's charts, heldout/* has one point per checkpoint, at its step.")


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    main()

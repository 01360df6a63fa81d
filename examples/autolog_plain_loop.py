"""A plain PyTorch loop checkpointed by ``mlflow_ckpt.autolog`` alone, then resumed by run ID.

python examples/autolog_plain_loop.py
"""

from __future__ import annotations

import os
import sys

import mlflow
import torch

import mlflow_ckpt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from demo_model import Classifier, synthetic_batch


def train(model, opt, start: int, stop: int, data: torch.Generator) -> None:
    val_x, val_y = synthetic_batch(torch.Generator().manual_seed(7), 256)
    for step in range(start, stop):
        x, y = synthetic_batch(data)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            val = torch.nn.functional.cross_entropy(model(val_x), val_y).item()
        mlflow.log_metrics({"train_loss": loss.item(), "val_loss": val}, step=step)


def main() -> None:
    options = {"save_every_n_steps": 10, "monitor": "val_loss", "keep_best_n": 2, "keep_last_n": 1}
    mlflow.set_experiment("mlflow-ckpt-autolog-demo")
    torch.manual_seed(0)
    model, data = Classifier(), torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    with mlflow.start_run() as run:
        mlflow_ckpt.autolog(model=model, optimizer=opt, state={"data": data}, **options)
        train(model, opt, 0, 30, data)
        mlflow_ckpt.autolog(disable=True)
    print("checkpoints:", [c.step for c in mlflow_ckpt.list_checkpoints(run.info.run_id)])

    model, data = Classifier(), torch.Generator()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    session = mlflow_ckpt.autolog(
        model=model, optimizer=opt, state={"data": data}, resume=run.info.run_id, **options
    )
    print("resumed at step", session.start_step)
    train(model, opt, session.start_step, 40, data)
    mlflow_ckpt.autolog(disable=True)
    print(
        "checkpoints after resume:", [c.step for c in mlflow_ckpt.list_checkpoints(run.info.run_id)]
    )


if __name__ == "__main__":
    main()

"""Fine-tune a head on a frozen backbone: incremental checkpoints, archived milestones.

    python examples/fine_tune_frozen.py

Uses MLflow's default store (``sqlite:///mlflow.db``). The backbone (about 94% of the
checkpoint's bytes) is frozen, so after the first checkpoint each save writes only the head
and its optimizer state; the backbone's bytes are written once, into the run's shared area,
and referenced by later checkpoints. Retention keeps the 2 newest checkpoints and a
milestone every 60 steps. A milestone is written whole, referencing nothing, so it stays a
fallback should a shared file ever be damaged (the save after it writes the backbone into
the shared area again); milestones older than the newest are archived in place (on this
local store: recompressed). The best checkpoint is then promoted, which copies the shared
bytes into its own folder so the registered version outlives the run.
"""

from __future__ import annotations

import os
import sys

import mlflow
import torch

import mlflow_ckpt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from demo_model import synthetic_batch

EXPERIMENT = "mlflow-ckpt-fine-tune-demo"
STEPS = 120


class FineTune(torch.nn.Module):
    """A wide "pretrained" backbone (frozen) and a small classification head."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = torch.nn.Sequential(
            torch.nn.Linear(20, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024), torch.nn.ReLU()
        )
        self.head = torch.nn.Linear(1024, 4)
        self.backbone.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def main() -> None:
    mlflow.set_experiment(EXPERIMENT)
    torch.manual_seed(0)
    model = FineTune()
    opt = torch.optim.AdamW(model.head.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(1)
    val_x, val_y = synthetic_batch(torch.Generator().manual_seed(7), 256)
    with mlflow.start_run(run_name="fine-tune") as run:
        with mlflow_ckpt.CheckpointManager(
            {"model": model, "optimizer": opt, "data": data},
            save_every_n_steps=10,
            monitor="val_loss",
            keep_last_n=2,
            keep_every_n_steps=60,
            archive_after_n=1,
            async_save=True,
        ) as manager:
            for step in range(manager.start_step, STEPS):
                x, y = synthetic_batch(data)
                loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    val = torch.nn.functional.cross_entropy(model(val_x), val_y).item()
                manager.step(step, {"train_loss": loss.item(), "val_loss": val})
    print(f"checkpoints of run {run.info.run_id} (newest first):")
    print(f"{'step':>5} {'size MB':>8} {'stored MB':>10}  tier")
    for ckpt in mlflow_ckpt.list_checkpoints(run.info.run_id):
        print(
            f"{ckpt.step:>5} {ckpt.size_bytes / 1e6:>8.2f} {ckpt.stored_bytes / 1e6:>10.2f}"
            f"  {ckpt.tier}"
        )
    best = mlflow_ckpt.best_checkpoint(run_id=run.info.run_id, metric="val_loss")
    assert best is not None
    version = mlflow_ckpt.promote(best, "fine-tuned-demo", alias="champion")
    promoted = mlflow_ckpt.list_checkpoints(run.info.run_id)
    stored = next(c.stored_bytes for c in promoted if c.model_id == best.model_id)
    print(
        f"best: step {best.step}, promoted to fine-tuned-demo version {version.version} "
        f"(@champion), now self-contained ({stored / 1e6:.2f} MB in its own folder)"
    )
    restored = FineTune()
    mlflow_ckpt.load(best, {"model": restored})
    val = torch.nn.functional.cross_entropy(restored(val_x), val_y).item()
    print(f"restored step {best.step}: val_loss {val:.4f}")


if __name__ == "__main__":
    main()

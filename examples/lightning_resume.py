"""Lightning: 2 epochs with MlflowCheckpoint, then resume the same MLflow run to 4 epochs.

pip install 'mlflow-ckpt[lightning]'; python examples/lightning_resume.py
"""

from __future__ import annotations

import lightning.pytorch as pl
import mlflow
import torch

import mlflow_ckpt
from mlflow_ckpt.lightning import MlflowCheckpoint


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1)
        )

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


def loaders():
    x = torch.randn(128, 8, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    return (
        torch.utils.data.DataLoader(data, batch_size=32, shuffle=True),
        torch.utils.data.DataLoader(data, batch_size=64),
    )


def fit(epochs: int, ckpt_path: str | None = None) -> str:
    callback = MlflowCheckpoint(monitor="val_loss", save_every_n_epochs=1, keep_best_n=2)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        callbacks=[callback],
    )
    trainer.fit(Regressor(), *loaders(), ckpt_path=ckpt_path)
    return callback.run_id


def main() -> None:
    mlflow.set_experiment("mlflow-ckpt-lightning-demo")
    pl.seed_everything(0)
    run_id = fit(2)
    run_id2 = fit(4, ckpt_path=mlflow_ckpt.resume_path(run_id))
    assert run_id2 == run_id
    print("run", run_id, "checkpoints:", [c.step for c in mlflow_ckpt.list_checkpoints(run_id)])


if __name__ == "__main__":
    main()

"""Lightning ``strategy="ddp"`` on 2 CPU processes with ``MlflowCheckpoint``, for the tests.

Lightning starts the second process itself (re-running this script), so this is a script:

    python tests/lightning_ddp_job.py EPOCHS OUT [RUN_ID]    (RUN_ID: resume that run)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning.pytorch as pl
import torch

import mlflow_ckpt
from mlflow_ckpt.lightning import MlflowCheckpoint
from tests.test_lightning import LitRegressor, loaders


def main() -> None:
    epochs, out = int(sys.argv[1]), Path(sys.argv[2])
    resume = sys.argv[3] if len(sys.argv) > 3 else None
    pl.seed_everything(7, verbose=False)
    model = LitRegressor()  # with dropout: each rank's random stream matters
    train, val = loaders()
    callback = MlflowCheckpoint(save_every_n_epochs=1)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        num_sanity_val_steps=0,
        deterministic=True,
        callbacks=[callback],
    )
    path = mlflow_ckpt.resume_path(resume) if resume else None  # each process's own folder
    trainer.fit(model, train, val, ckpt_path=path)
    assert path is None or not Path(path).exists(), f"{path}: resume_path's copy is left"
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, out / "weights.pt")
        (out / "run_id").write_text(callback.run_id or "")
    if torch.distributed.is_initialized():  # every group torn down before exit (as dist_job)
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

"""A Lightning or Hugging Face training with ``mlflow_ckpt.autolog(resume="auto")``: the same
command line every time, as a scheduler restarts a preempted job.

    python -m tests.framework_job lightning|hf --epochs N --out FILE [--kill-at EPOCH]
        [--workers W]

The train loader is ``DataLoader(..., shuffle=True, generator=Generator().manual_seed(5))``
(for the Trainer, returned by ``get_train_dataloader``), so its data order comes from that
generator alone. ``--kill-at E`` SIGKILLs the process at the second batch of epoch E (first
attempt only: the marker file ``OUT.killed`` records it); ``--sigterm-at E`` SIGTERMs it
there. The final weights go to ``--out`` (safetensors) for the test to compare with an
uninterrupted run's.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import mlflow_ckpt

SEED = 5


def dataset() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 8, generator=g)
    return torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True))


def network() -> torch.nn.Module:
    """The same small regressor for both frameworks (dropout: its stream must resume too)."""
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1)
    )


def as_dict(rows: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The Trainer calls ``model(**batch)``: batches of named tensors."""
    return {"x": torch.stack([r[0] for r in rows]), "y": torch.stack([r[1] for r in rows])}


def train_loader(workers: int, collate: Any = None) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset(),
        batch_size=8,
        shuffle=True,
        num_workers=workers,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(SEED),
    )


class Killer:
    """``sig`` to this process at the second batch of epoch ``epoch``, once (the marker file
    remembers): SIGKILL, or SIGTERM (a preemption notice: the manager saves, then the
    framework or the signal's default action ends the process)."""

    def __init__(self, epoch: int | None, marker: Path, sig: int) -> None:
        self.epoch, self.marker, self.sig = epoch, marker, sig

    def maybe_kill(self, epoch: int, batch: int) -> None:
        if self.epoch == epoch and batch == 1 and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), self.sig)


def run_lightning(args: argparse.Namespace, killer: Killer) -> dict[str, torch.Tensor]:
    import lightning.pytorch as pl

    class Regressor(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = network()

        def training_step(self, batch: Any, index: int) -> torch.Tensor:
            killer.maybe_kill(self.current_epoch, index)
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> Any:
            opt = torch.optim.AdamW(self.parameters(), lr=0.01)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.8)}

    pl.seed_everything(7, verbose=False)
    model = Regressor()
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        deterministic=True,
    )
    trainer.fit(model, train_loader(args.workers))  # autolog resumes it when the job has a run
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def run_hf(args: argparse.Namespace, killer: Killer) -> dict[str, torch.Tensor]:
    import transformers

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = network()

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": torch.nn.functional.mse_loss(self.net(x), y)}

    class Trainer(transformers.Trainer):
        def get_train_dataloader(self) -> torch.utils.data.DataLoader:
            return train_loader(args.workers, as_dict)  # the user's own seeded loader

    class Kill(transformers.TrainerCallback):
        def on_step_begin(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
            per_epoch = 6
            killer.maybe_kill(state.global_step // per_epoch, state.global_step % per_epoch)

    transformers.set_seed(7)
    model = Model()
    training = transformers.TrainingArguments(
        output_dir=str(args.out.parent / "hf-out"),
        num_train_epochs=args.epochs,
        learning_rate=1e-2,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=7,
        disable_tqdm=True,
        logging_strategy="epoch",
    )
    trainer = Trainer(model=model, args=training, train_dataset=dataset(), callbacks=[Kill()])
    trainer.train()  # autolog resumes it when the job has a run
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def main(argv: list[str]) -> None:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    p = argparse.ArgumentParser()
    p.add_argument("framework", choices=["lightning", "hf"])
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--kill-at", type=int)
    p.add_argument("--sigterm-at", type=int)
    p.add_argument("--workers", type=int, default=0)
    args = p.parse_args(argv)
    mlflow_ckpt.autolog(resume="auto", async_save=False)  # the key: MLFLOW_CKPT_RUN_KEY
    marker = args.out.with_suffix(".killed")
    if args.sigterm_at is not None:
        killer = Killer(args.sigterm_at, marker, signal.SIGTERM)
    else:
        killer = Killer(args.kill_at, marker, signal.SIGKILL)
    run = run_lightning if args.framework == "lightning" else run_hf
    weights = run(args, killer)
    mlflow_ckpt.autolog(disable=True)
    save_file(weights, str(args.out))


if __name__ == "__main__":
    main(sys.argv[1:])

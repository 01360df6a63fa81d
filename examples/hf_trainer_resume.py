"""Hugging Face Trainer: train with MlflowCheckpointCallback, then resume the same MLflow run.

    pip install 'mlflow-ckpt[transformers]'; python examples/hf_trainer_resume.py

The model is built from a small config: nothing is downloaded.
"""

from __future__ import annotations

import tempfile

import mlflow
import torch
import transformers

import mlflow_ckpt
from mlflow_ckpt.transformers import MlflowCheckpointCallback


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.ids = torch.randint(0, 50, (n, 8), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": (self.ids[i, 0] % 2).long()}


def trainer(epochs: int, out: str) -> transformers.Trainer:
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
    )
    args = transformers.TrainingArguments(
        output_dir=out,
        num_train_epochs=epochs,
        per_device_train_batch_size=8,
        eval_strategy="epoch",
        save_strategy="no",
        logging_strategy="epoch",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    return transformers.Trainer(
        model=transformers.BertForSequenceClassification(config),
        args=args,
        train_dataset=Tokens(64),
        eval_dataset=Tokens(16),
        callbacks=[MlflowCheckpointCallback(monitor="eval_loss", save_every_n_epochs=1)],
    )


def main() -> None:
    mlflow.set_experiment("mlflow-ckpt-hf-demo")
    out = tempfile.mkdtemp()
    transformers.set_seed(0)
    first = trainer(2, out)
    first.train()
    (ours,) = [
        c for c in first.callback_handler.callbacks if isinstance(c, MlflowCheckpointCallback)
    ]
    run_id = ours.run_id
    second = trainer(3, out)
    second.train(resume_from_checkpoint=mlflow_ckpt.resume_path(run_id))
    print("run", run_id, "checkpoints:", [c.step for c in mlflow_ckpt.list_checkpoints(run_id)])


if __name__ == "__main__":
    main()

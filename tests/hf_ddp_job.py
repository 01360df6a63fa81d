"""A Hugging Face Trainer on 2 CPU processes (``torchrun``, DDP over gloo) with
``MlflowCheckpointCallback``, for the tests.

    torchrun --nproc_per_node 2 tests/hf_ddp_job.py EPOCHS STOP_AFTER OUT [RUN_ID]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist

import mlflow_ckpt
from mlflow_ckpt.transformers import MlflowCheckpointCallback
from tests.test_transformers import _StopAfterEpochs, make_trainer


def main() -> None:
    epochs, stop_after, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    resume = sys.argv[4] if len(sys.argv) > 4 else None
    callback = MlflowCheckpointCallback(async_save=False)
    trainer = make_trainer(out / "trainer", epochs, callback, ddp_backend="gloo")
    if stop_after < epochs:
        trainer.add_callback(_StopAfterEpochs(stop_after))
    path = mlflow_ckpt.resume_path(resume) if resume else None  # a folder of each process's own
    trainer.train(resume_from_checkpoint=path)
    assert path is None or not Path(path).exists(), f"{path}: resume_path's copy is left"
    rank = dist.get_rank() if dist.is_initialized() else 0
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    torch.save(weights, out / f"weights-{rank}.pt")
    if rank == 0:
        (out / "run_id").write_text(callback.run_id or "")
    if dist.is_initialized():  # every group torn down before exit, as torchrun jobs should
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

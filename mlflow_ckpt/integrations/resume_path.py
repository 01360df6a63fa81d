"""``resume_path(run_id)``: a run's newest verified checkpoint, laid out for its framework.

Lightning resumes from a ``.ckpt`` file and the Hugging Face Trainer from a
``checkpoint-N`` folder; both are written here from the checkpoint's plain state (every hash
checked first), so ``trainer.fit(ckpt_path=...)`` / ``trainer.train(resume_from_checkpoint=
...)`` continue the same MLflow run where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, overload

import torch
from mlflow import MlflowClient

from mlflow_ckpt.catalog import newest_verified
from mlflow_ckpt.errors import CheckpointError, CheckpointNotFoundError
from mlflow_ckpt.integrations.framework_state import (
    HF_CALLBACK_ENTRY,
    HF_TRAINER_STATE_KEY,
    LIGHTNING_KEY,
)
from mlflow_ckpt.integrations.resume_folder import make_temporary
from mlflow_ckpt.manager.job import find_job_run, job_key
from mlflow_ckpt.snapshot import plain_state

logger = logging.getLogger(__name__)


@overload
def resume_path(
    run_id: Literal["auto"], *, dst: str | Path | None = None, run_name: str | None = None
) -> str | None: ...


@overload
def resume_path(run_id: str, *, dst: str | Path | None = None) -> str: ...


def resume_path(
    run_id: str, *, dst: str | Path | None = None, run_name: str | None = None
) -> str | None:
    """Write the newest verified checkpoint of ``run_id`` where its framework can resume from.

    ``run_id="auto"``: this job's run, found by its key as ``resume="auto"`` finds it
    (``run_name=``, else ``MLFLOW_CKPT_RUN_KEY``, ``TORCHELASTIC_RUN_ID``, ``SLURM_JOB_ID``);
    ``None`` when the job has no run or no checkpoint yet, so the same line starts a fresh
    training and resumes a restarted one::

        trainer.fit(model, ckpt_path=mlflow_ckpt.resume_path("auto"))
        trainer.train(resume_from_checkpoint=mlflow_ckpt.resume_path("auto"))

    For a run checkpointed by :class:`mlflow_ckpt.lightning.MlflowCheckpoint` this is a
    Lightning checkpoint file, for ``trainer.fit(model, ckpt_path=...)``; for one checkpointed
    by :class:`mlflow_ckpt.transformers.MlflowCheckpointCallback` a Trainer checkpoint folder,
    for ``trainer.train(resume_from_checkpoint=...)``. Every file is hash-checked first (corrupt
    checkpoints are skipped with a warning and tagged, as resume does). The checkpoint names its
    run, so training continues that same MLflow run.

    ``dst`` is the folder to write into, kept as it is. By default a new temporary folder is
    made instead, and the integration's callback removes it once the framework has read it
    (Lightning: when training starts; the Trainer: after its first step), so one path
    serves one resume: call ``resume_path`` again to resume again.
    """
    auto = run_id == "auto"
    if auto:
        found = find_job_run(job_key(run_name))
        if found is None:
            return None  # a first start: nothing to resume
        run_id = found.info.run_id
    elif run_name is not None:
        raise TypeError("run_name= names the job for resume_path('auto'); a run ID is given")
    verified = newest_verified(run_id, MlflowClient())
    if verified is None and auto:
        return None  # the job's run has no checkpoint yet (killed before its first)
    if verified is None:
        raise CheckpointNotFoundError(
            f"Run {run_id} has no committed checkpoint that verifies, so there is nothing to "
            "resume from. `mlflow-ckpt list RUN_ID` shows its checkpoints; start the training "
            "from scratch instead."
        )
    ckpt, state = verified.checkpoint, plain_state(verified.loaded.decoded)
    folder = Path(dst) if dst is not None else make_temporary(run_id)
    if LIGHTNING_KEY in state:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{run_id}-step{ckpt.step}.ckpt"
        torch.save(state[LIGHTNING_KEY], path)
        logger.info("Wrote Lightning checkpoint for %s to %s", ckpt.uri, path)
        return str(path)
    if HF_TRAINER_STATE_KEY in state:
        path = folder / f"checkpoint-{ckpt.step + 1}"
        _write_hf_folder(state, path, temporary=folder if dst is None else None)
        logger.info("Wrote Trainer checkpoint folder for %s to %s", ckpt.uri, path)
        return str(path)
    raise CheckpointError(
        f"Checkpoint {ckpt.uri} of run {run_id} was not written by the Lightning or Hugging "
        "Face integration, so no framework can resume from a path. Resume a plain loop with "
        f"mlflow_ckpt.autolog(model=..., optimizer=..., resume={run_id!r}) or "
        f"CheckpointManager.resume({run_id!r}, state)."
    )


def _write_hf_folder(state: Mapping[str, Any], path: Path, *, temporary: Path | None) -> None:
    """Lay a checkpoint out as the Trainer's ``checkpoint-N`` folder.

    ``temporary``: the folder :func:`make_temporary` made around it. The Trainer never tells
    its callbacks which folder it resumed from, so our callback's entry in the Trainer state
    names it, for the callback to remove once the Trainer has read it."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    weights: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in state["model"].items():
        # safetensors refuses shared storage (tied embeddings): give each name its own copy
        ptr = tensor.untyped_storage().data_ptr()
        weights[key] = tensor.clone().contiguous() if ptr in seen else tensor.contiguous()
        seen.add(ptr)
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    if "optimizer" in state:
        torch.save(state["optimizer"], path / "optimizer.pt")
    if "scheduler" in state:
        torch.save(state["scheduler"], path / "scheduler.pt")
    if "scaler" in state:
        torch.save(state["scaler"], path / "scaler.pt")
    rng = state.get("_rng") or {}
    if rng:
        hf_rng = {"python": rng["python"], "numpy": rng["numpy"], "cpu": rng["torch"]}
        if "cuda" in rng:
            hf_rng["cuda"] = rng["cuda"]
        torch.save(hf_rng, path / "rng_state.pth")
    (path / "trainer_state.json").write_text(
        _with_resume_folder(state[HF_TRAINER_STATE_KEY]["json"], temporary)
    )
    (path / "mlflow_ckpt.json").write_text(
        json.dumps({"written_at": time.time(), "step": state.get("_progress", {}).get("step")})
    )


def _with_resume_folder(trainer_state: str, temporary: Path | None) -> str:
    """The Trainer state JSON, our callback's entry naming ``temporary`` (if any)."""
    if temporary is None:
        return trainer_state
    data = json.loads(trainer_state)
    callbacks = data["stateful_callbacks"] = data.get("stateful_callbacks") or {}
    entry = callbacks[HF_CALLBACK_ENTRY] = callbacks.get(HF_CALLBACK_ENTRY) or {}
    entry["attributes"] = {**(entry.get("attributes") or {}), "resume_folder": str(temporary)}
    return json.dumps(data, indent=2, sort_keys=True)

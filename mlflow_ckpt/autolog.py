"""``mlflow_ckpt.autolog()``: checkpoints without changing the training loop, and ``resume_path``.

``autolog(**manager_kwargs)`` patches ``Trainer.fit`` of PyTorch Lightning and
``Trainer.__init__``/``train`` of Hugging Face transformers (whichever is installed) so that
every trainer gets our checkpoint callback. ``autolog(model=..., optimizer=...)`` also
watches a plain PyTorch loop: it counts optimizer steps through torch's optimizer step hooks
and observes ``mlflow.log_metric(s)`` of the monitored metric. ``autolog(disable=True)`` puts
every patched method back and removes every hook.

The patches are the only global state: one record of what was replaced (``_PATCHES``) and
the plain-loop sessions (``_SESSIONS``), both emptied by ``disable=True``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import json
import logging
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import mlflow
import torch

from mlflow_ckpt._integration_common import (
    HF_TRAINER_STATE_KEY,
    LIGHTNING_KEY,
    end_run_if_started,
    newest_training_state,
    numeric_metrics,
    start_run_if_needed,
)
from mlflow_ckpt.errors import CheckpointError
from mlflow_ckpt.manager import CheckpointManager

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _Patch:
    owner: Any
    name: str
    original: Any
    wrapper: Any
    active: bool = True


_PATCHES: list[_Patch] = []
_SESSIONS: list[PlainLoopCheckpointer] = []


def _patch(owner: Any, name: str, make: Callable[[Any, _Patch], Any]) -> None:
    """Replace ``owner.name`` with a wrapper that becomes a pass-through once disabled."""
    original = owner.__dict__[name] if name in owner.__dict__ else getattr(owner, name)
    record = _Patch(owner, name, original, None)
    record.wrapper = make(original, record)
    setattr(owner, name, record.wrapper)
    _PATCHES.append(record)


def _unpatch_all() -> None:
    """Restore every patched method; one wrapped again by someone else is only deactivated."""
    while _PATCHES:
        record = _PATCHES.pop()
        record.active = False
        if record.owner.__dict__.get(record.name) is record.wrapper:
            setattr(record.owner, record.name, record.original)


# ---------------------------------------------------------------------- frameworks


def _lightning_packages() -> list[str]:
    return [m for m in ("lightning.pytorch", "pytorch_lightning") if _installed(m)]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _patch_lightning(package_name: str, options: dict[str, Any]) -> None:
    from mlflow_ckpt.lightning import callback_class

    package = importlib.import_module(package_name)
    cls = callback_class(package)

    def make(original: Any, record: _Patch) -> Any:
        @functools.wraps(original)
        def fit(self: Any, *args: Any, **kwargs: Any) -> Any:
            if record.active and not any(isinstance(cb, cls) for cb in self.callbacks):
                self.callbacks.append(cls(**options))
            return original(self, *args, **kwargs)

        return fit

    _patch(package.Trainer, "fit", make)


def _patch_transformers(options: dict[str, Any]) -> None:
    transformers = importlib.import_module("transformers")
    from mlflow_ckpt.transformers import MlflowCheckpointCallback

    def attach(trainer: Any) -> None:
        callbacks = trainer.callback_handler.callbacks
        if not any(isinstance(cb, MlflowCheckpointCallback) for cb in callbacks):
            trainer.add_callback(MlflowCheckpointCallback(trainer=trainer, **options))

    def make_init(original: Any, record: _Patch) -> Any:
        @functools.wraps(original)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            if record.active:
                attach(self)

        return __init__

    def make_train(original: Any, record: _Patch) -> Any:
        @functools.wraps(original)
        def train(self: Any, *args: Any, **kwargs: Any) -> Any:
            if record.active:
                attach(self)  # trainers built before autolog() was called
            return original(self, *args, **kwargs)

        return train

    _patch(transformers.Trainer, "__init__", make_init)
    _patch(transformers.Trainer, "train", make_train)


# ---------------------------------------------------------------------- plain loops


class PlainLoopCheckpointer:
    """Checkpoints a plain PyTorch loop from its optimizer steps and its MLflow metrics.

    Made by ``mlflow_ckpt.autolog(model=..., optimizer=...)``. Optimizer step ``k``
    (0-based) is recorded with the manager once the loop has moved past it: when the monitored
    metric is logged with ``mlflow.log_metric(s)`` after it (the state, scheduler included, is
    then exactly "after step k", so a "best" checkpoint resumes exactly), or else when the next
    optimizer step begins, or on :meth:`close`. ``start_step`` is where a resumed loop goes on.
    Metrics the loop logs are never logged again; the values at saved steps are linked to
    their checkpoints.
    """

    def __init__(
        self,
        state: Mapping[str, Any],
        optimizers: list[torch.optim.Optimizer],
        *,
        resume: str | None,
        manager_kwargs: dict[str, Any],
    ) -> None:
        self.state = dict(state)
        self.manager_kwargs = dict(manager_kwargs, log_metrics=False)
        self.monitor: str | None = manager_kwargs.get("monitor")
        self.manager: CheckpointManager | None = None
        self.run_id: str | None = None
        self._started_run = False
        self._steps_done = 0  # optimizer steps finished (counted on the first optimizer)
        self._pending: int | None = None  # finished step not yet given to the manager
        self._metrics: dict[str, float] = {}
        self._hooks: list[Any] = []
        # Metrics the loop logs after a step get this timestamp, and so do their links to
        # the step's checkpoint: MLflow then keeps one history entry for both.
        self.timestamp_ms: int | None = None
        if resume is not None:
            self._started_run = mlflow.active_run() is None
            self.manager = CheckpointManager.resume(resume, self.state, **self.manager_kwargs)
            self.run_id = resume
            self._steps_done = self.manager.start_step
        self.start_step = self._steps_done
        first = optimizers[0]
        self._hooks.append(first.register_step_pre_hook(self._before_step))
        self._hooks.append(first.register_step_post_hook(self._after_step))

    # -------------------------------------------------- hooks

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._flush()

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._flush()
        self._pending = self._steps_done
        self._steps_done += 1
        self._metrics = {}
        self.timestamp_ms = int(time.time() * 1000)

    def observe(self, metrics: Mapping[str, Any]) -> None:
        """Called with what the loop logs through ``mlflow.log_metric(s)``."""
        if self._pending is None:
            return
        self._metrics.update(numeric_metrics(metrics))
        if self.monitor is not None and self.monitor in metrics:
            self._flush()

    def _flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if self.manager is None:
            self.run_id, self._started_run = start_run_if_needed()
            self.manager = CheckpointManager(self.state, run_id=self.run_id, **self.manager_kwargs)
        self.manager.step(pending, metrics=self._metrics, timestamp_ms=self.timestamp_ms)
        self._metrics = {}

    def close(self) -> None:
        """Record the last step, wait for uploads, save the last step, remove the hooks."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        try:
            self._flush()
            if self.manager is not None:
                self.manager.close()
        finally:
            end_run_if_started(self.run_id, self._started_run)
            self._started_run = False


def _stamp(kwargs: dict[str, Any]) -> None:
    """Give a metric logged to the active run after a step that step's timestamp."""
    if kwargs.get("timestamp") is not None or kwargs.get("run_id") is not None:
        return
    for session in _SESSIONS:
        if session._pending is not None and session.timestamp_ms is not None:
            kwargs["timestamp"] = session.timestamp_ms
            return


def _patch_mlflow_metrics() -> None:
    """Observe ``mlflow.log_metric``/``log_metrics`` (the loop's own logging stays as it is)."""

    def make_one(original: Any, record: _Patch) -> Any:
        @functools.wraps(original)
        def log_metric(key: str, value: float, *args: Any, **kwargs: Any) -> Any:
            if record.active and len(args) < 3:
                _stamp(kwargs)
            result = original(key, value, *args, **kwargs)
            if record.active:
                for session in list(_SESSIONS):
                    session.observe({key: value})
            return result

        return log_metric

    def make_many(original: Any, record: _Patch) -> Any:
        @functools.wraps(original)
        def log_metrics(metrics: dict[str, float], *args: Any, **kwargs: Any) -> Any:
            if record.active and len(args) < 4:
                _stamp(kwargs)
            result = original(metrics, *args, **kwargs)
            if record.active:
                for session in list(_SESSIONS):
                    session.observe(metrics)
            return result

        return log_metrics

    _patch(mlflow, "log_metric", make_one)
    _patch(mlflow, "log_metrics", make_many)


# ---------------------------------------------------------------------- public API


def autolog(
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer] | None = None,
    scheduler: Any = None,
    state: Mapping[str, Any] | None = None,
    resume: str | None = None,
    disable: bool = False,
    lightning: bool = True,
    transformers: bool = True,
    **manager_kwargs: Any,
) -> PlainLoopCheckpointer | None:
    """Checkpoint Lightning, Hugging Face and plain PyTorch training to MLflow with one call.

    ``manager_kwargs`` are :class:`mlflow_ckpt.CheckpointManager`'s (``save_every_n_steps``,
    ``monitor``, ``mode``, ``keep_last_n``, ``keep_best_n``...). Every Lightning ``Trainer.fit``
    and Hugging Face ``Trainer`` then gets our callback with them. With ``model`` and
    ``optimizer`` (and optionally ``scheduler``, or a full ``state`` dict) a plain loop is
    checkpointed too: the returned :class:`PlainLoopCheckpointer` counts its optimizer steps;
    ``resume=run_id`` restores the newest checkpoint of that run into the objects and
    continues the run (the loop starts at ``.start_step``). Calling ``autolog`` again replaces
    the previous configuration; ``autolog(disable=True)`` undoes everything (closing plain-loop
    sessions, which saves their last step).
    """
    _disable()
    if disable:
        return None
    if lightning:
        for package in _lightning_packages():
            _patch_lightning(package, dict(manager_kwargs))
    if transformers and _installed("transformers"):
        _patch_transformers(dict(manager_kwargs))
    if model is None and state is None:
        if optimizer is not None or scheduler is not None or resume is not None:
            raise TypeError("plain-loop autolog needs model= (or state=) as well as optimizer=")
        return None
    optimizers = optimizer if isinstance(optimizer, list) else [optimizer] if optimizer else []
    if not optimizers:
        raise TypeError("plain-loop autolog counts steps through the optimizer: pass optimizer=...")
    full: dict[str, Any] = dict(state or {})
    if model is not None:
        full.setdefault("model", model)
    for index, opt in enumerate(optimizers):
        full.setdefault("optimizer" if index == 0 else f"optimizer_{index}", opt)
    if scheduler is not None:
        full.setdefault("scheduler", scheduler)
    _patch_mlflow_metrics()
    session = PlainLoopCheckpointer(
        full, optimizers, resume=resume, manager_kwargs=dict(manager_kwargs)
    )
    _SESSIONS.append(session)
    return session


def _disable() -> None:
    errors: list[BaseException] = []
    while _SESSIONS:
        try:
            _SESSIONS.pop().close()
        except Exception as exc:
            errors.append(exc)
    _unpatch_all()
    if errors:
        raise errors[0]


def resume_path(run_id: str, *, dst: str | Path | None = None) -> str:
    """Write the newest verified checkpoint of ``run_id`` where its framework can resume from.

    For a run checkpointed by :class:`mlflow_ckpt.lightning.MlflowCheckpoint` this is a
    Lightning checkpoint file, for ``trainer.fit(model, ckpt_path=...)``; for one checkpointed
    by :class:`mlflow_ckpt.transformers.MlflowCheckpointCallback` a Trainer checkpoint folder,
    for ``trainer.train(resume_from_checkpoint=...)``. Every file is hash-checked first (corrupt
    checkpoints are skipped). The checkpoint names its run, so training continues that same
    MLflow run. ``dst`` is the folder to write into (a new temporary folder by default).
    """
    ckpt, state = newest_training_state(run_id)
    folder = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="mlflow-ckpt-"))
    if LIGHTNING_KEY in state:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{run_id}-step{ckpt.step}.ckpt"
        torch.save(state[LIGHTNING_KEY], path)
        logger.info("Wrote Lightning checkpoint for %s to %s", ckpt.uri, path)
        return str(path)
    if HF_TRAINER_STATE_KEY in state:
        path = folder / f"checkpoint-{ckpt.step + 1}"
        _write_hf_folder(state, path)
        logger.info("Wrote Trainer checkpoint folder for %s to %s", ckpt.uri, path)
        return str(path)
    raise CheckpointError(
        f"Checkpoint {ckpt.uri} of run {run_id} was not written by the Lightning or Hugging "
        "Face integration, so no framework can resume from a path. Resume a plain loop with "
        f"mlflow_ckpt.autolog(model=..., optimizer=..., resume={run_id!r}) or "
        f"CheckpointManager.resume({run_id!r}, state)."
    )


def _write_hf_folder(state: Mapping[str, Any], path: Path) -> None:
    """Lay a checkpoint out as the Trainer's ``checkpoint-N`` folder."""
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
    (path / "trainer_state.json").write_text(state[HF_TRAINER_STATE_KEY]["json"])
    (path / "mlflow_ckpt.json").write_text(
        json.dumps({"written_at": time.time(), "step": state.get("_progress", {}).get("step")})
    )


__all__ = ["PlainLoopCheckpointer", "autolog", "resume_path"]

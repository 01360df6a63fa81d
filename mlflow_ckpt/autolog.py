"""``mlflow_ckpt.autolog()``: checkpoints without changing the training loop.

``autolog(**manager_kwargs)`` patches ``Trainer.fit`` of PyTorch Lightning and
``Trainer.__init__``/``train`` of Hugging Face transformers (whichever is installed) so that
every trainer gets our checkpoint callback. ``autolog(model=..., optimizer=...)`` also
watches a plain PyTorch loop (:class:`~mlflow_ckpt.integrations.plain_loop.PlainLoopCheckpointer`):
it counts optimizer steps through torch's optimizer step hooks and observes
``mlflow.log_metric(s)`` of the monitored metric. ``autolog(disable=True)`` puts every
patched method back and removes every hook.

The patches are the only global state: the record of what was replaced
(:mod:`mlflow_ckpt.integrations.patching`) and the plain-loop sessions (``_SESSIONS``), both
emptied by ``disable=True``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
from collections.abc import Mapping
from typing import Any

import mlflow
import torch

from mlflow_ckpt.integrations.loader_state import LoaderGenerators
from mlflow_ckpt.integrations.patching import Patch, patch, unpatch_all
from mlflow_ckpt.integrations.plain_loop import PlainLoopCheckpointer
from mlflow_ckpt.integrations.resume_path import resume_path
from mlflow_ckpt.manager.job import job_key

_SESSIONS: list[PlainLoopCheckpointer] = []


def autolog(
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer] | None = None,
    scheduler: Any = None,
    state: Mapping[str, Any] | None = None,
    dataloaders: Any = None,
    resume: str | None = None,
    run_name: str | None = None,
    disable: bool = False,
    lightning: bool = True,
    transformers: bool = True,
    **manager_kwargs: Any,
) -> PlainLoopCheckpointer | None:
    """Checkpoint Lightning, Hugging Face and plain PyTorch training to MLflow with one call.

    ``manager_kwargs`` are :class:`mlflow_ckpt.CheckpointManager`'s (``save_every_n_steps``,
    ``monitor``, ``mode``, ``keep_last_n``, ``keep_best_n``...). Every Lightning ``Trainer.fit``
    and Hugging Face ``Trainer`` then gets our callback with them. With ``model`` and
    ``optimizer`` (and optionally ``scheduler``, ``dataloaders`` whose seeded generators set
    the data order, or a full ``state`` dict) a plain loop is checkpointed too: the returned
    :class:`PlainLoopCheckpointer` counts its optimizer steps; ``resume=run_id`` restores the
    newest checkpoint of that run into the objects and continues the run (the loop starts at
    ``.start_step``).

    ``resume="auto"`` (with ``run_name=``, or the job's key from the environment: see
    :class:`~mlflow_ckpt.CheckpointManager`) makes the identical command resume itself after
    a restart: the job's own run is found again, a ``Trainer.fit``/``train`` that is given no
    checkpoint resumes from the job's newest one, a plain loop starts at ``.start_step``, and
    SIGTERM saves the current step before the process ends. Calling ``autolog`` again replaces
    the previous configuration; ``autolog(disable=True)`` undoes everything (closing plain-loop
    sessions, which saves their last step).
    """
    _disable()
    if disable:
        return None
    if resume == "auto" or run_name is not None:  # the job's run, for every training
        manager_kwargs.update(_job_options(resume, run_name))
        resume = None
    if lightning:
        for package in _lightning_packages():
            _patch_lightning(package, dict(manager_kwargs))
    if transformers and _installed("transformers"):
        _patch_transformers(dict(manager_kwargs))
    if model is None and state is None:
        if any(v is not None for v in (optimizer, scheduler, resume, dataloaders)):
            raise TypeError("plain-loop autolog needs model= (or state=) as well as optimizer=")
        return None
    optimizers = optimizer if isinstance(optimizer, list) else [optimizer] if optimizer else []
    if not optimizers:
        raise TypeError("plain-loop autolog counts steps through the optimizer: pass optimizer=...")
    full = _plain_loop_state(state, model, optimizers, scheduler, dataloaders)
    _patch_mlflow_metrics()
    session = PlainLoopCheckpointer(
        full, optimizers, resume=resume, manager_kwargs=dict(manager_kwargs)
    )
    _SESSIONS.append(session)
    return session


def _job_options(resume: str | None, run_name: str | None) -> dict[str, Any]:
    """The manager options of ``resume="auto"``, its key checked now (before any patch)."""
    if resume != "auto":
        raise TypeError("run_name= names the job for resume='auto'; pass resume='auto' too")
    job_key(run_name)  # no key: a ValueError saying which to set
    return {"resume": "auto", "run_name": run_name}


def _plain_loop_state(
    state: Mapping[str, Any] | None,
    model: torch.nn.Module | None,
    optimizers: list[torch.optim.Optimizer],
    scheduler: Any,
    dataloaders: Any,
) -> dict[str, Any]:
    """A plain loop's checkpoint state: ``state``, then the named objects it lacks."""
    full: dict[str, Any] = dict(state or {})
    if model is not None:
        full.setdefault("model", model)
    for index, opt in enumerate(optimizers):
        full.setdefault("optimizer" if index == 0 else f"optimizer_{index}", opt)
    if scheduler is not None:
        full.setdefault("scheduler", scheduler)
    if dataloaders is not None:  # their seeded generators: the order of the data
        full.setdefault("dataloaders", LoaderGenerators(lambda: dataloaders))
    return full


def _disable() -> None:
    errors: list[BaseException] = []
    while _SESSIONS:
        try:
            _SESSIONS.pop().close()
        except Exception as exc:
            errors.append(exc)
    unpatch_all()
    if errors:
        raise errors[0]


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

    def make(original: Any, record: Patch) -> Any:
        @functools.wraps(original)
        def fit(self: Any, *args: Any, **kwargs: Any) -> Any:
            if record.active and not any(isinstance(cb, cls) for cb in self.callbacks):
                self.callbacks.append(cls(**options))
            if record.active:
                _resume_from_job(original, (self, *args), kwargs, "ckpt_path", options)
            return original(self, *args, **kwargs)

        return fit

    patch(package.Trainer, "fit", make)


def _patch_transformers(options: dict[str, Any]) -> None:
    transformers = importlib.import_module("transformers")
    from mlflow_ckpt.transformers import MlflowCheckpointCallback

    def attach(trainer: Any) -> None:
        callbacks = trainer.callback_handler.callbacks
        if not any(isinstance(cb, MlflowCheckpointCallback) for cb in callbacks):
            trainer.add_callback(MlflowCheckpointCallback(trainer=trainer, **options))

    def make_init(original: Any, record: Patch) -> Any:
        @functools.wraps(original)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            if record.active:
                attach(self)

        return __init__

    def make_train(original: Any, record: Patch) -> Any:
        @functools.wraps(original)
        def train(self: Any, *args: Any, **kwargs: Any) -> Any:
            if record.active:
                attach(self)  # trainers built before autolog() was called
                where = "resume_from_checkpoint"
                _resume_from_job(original, (self, *args), kwargs, where, options)
            return original(self, *args, **kwargs)

        return train

    patch(transformers.Trainer, "__init__", make_init)
    patch(transformers.Trainer, "train", make_train)


def _resume_from_job(
    original: Any, args: tuple[Any, ...], kwargs: dict[str, Any], name: str, options: Any
) -> None:
    """``resume="auto"``: a ``fit``/``train`` given no checkpoint resumes from the job's
    newest one (``kwargs[name]`` is set; on a first start there is none and it stays unset)."""
    if options.get("resume") != "auto":
        return
    if name in inspect.signature(original).bind_partial(*args, **kwargs).arguments:
        return  # the user chose (a checkpoint, or None): the callback checks it is the job's
    path = resume_path("auto", run_name=options.get("run_name"))
    if path is not None:
        kwargs[name] = path


# ---------------------------------------------------------------------- plain loops


def _stamp(kwargs: dict[str, Any]) -> None:
    """Give a metric logged to the active run after a step that step's timestamp."""
    if kwargs.get("timestamp") is not None or kwargs.get("run_id") is not None:
        return
    for session in _SESSIONS:
        if session.waiting and session.timestamp_ms is not None:
            kwargs["timestamp"] = session.timestamp_ms
            return


def _patch_mlflow_metrics() -> None:
    """Observe ``mlflow.log_metric``/``log_metrics`` (the loop's own logging stays as it is)."""

    def make_one(original: Any, record: Patch) -> Any:
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

    def make_many(original: Any, record: Patch) -> Any:
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

    patch(mlflow, "log_metric", make_one)
    patch(mlflow, "log_metrics", make_many)


__all__ = ["PlainLoopCheckpointer", "autolog", "resume_path"]

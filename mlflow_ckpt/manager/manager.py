"""``CheckpointManager``: one call in the training loop saves, logs and later resumes.

The manager decides when a step is saved (triggers), takes the in-memory snapshot on the
training thread, and hands encoding, hashing, upload and commit to a background worker
(``async_save=True``) or does them inline. It also logs the metrics given to ``step()`` so
that each step appears exactly once in the run's history, even across kills and resumes:
metrics of a step are logged when the next step arrives (or on ``save``/``wait``/``close``),
so the metrics of a saved step can be linked to its LoggedModel in the same call, and after
a resume, steps whose metrics reached MLflow before the crash are not logged again.
"""

from __future__ import annotations

import atexit
import json
import logging
import numbers
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import mlflow
from mlflow import MlflowClient

from mlflow_ckpt import flavor
from mlflow_ckpt.catalog import models, tags
from mlflow_ckpt.catalog.checkpoint import Checkpoint
from mlflow_ckpt.catalog.queries import list_checkpoints
from mlflow_ckpt.catalog.reader import describe, read_checkpoint, resolve
from mlflow_ckpt.catalog.recovery import logged_pairs, recover_run
from mlflow_ckpt.catalog.runs import get_run
from mlflow_ckpt.codec import DEFAULT_MAX_SHARD_BYTES, check_format
from mlflow_ckpt.errors import (
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    NoActiveRunError,
)
from mlflow_ckpt.manager.lease import DEFAULT_TTL_S, WriterLease
from mlflow_ckpt.manager.pipeline import SaveJob, WriteTarget, write_checkpoint
from mlflow_ckpt.manager.retention import RetentionPolicy, apply_retention, build_policy
from mlflow_ckpt.manager.triggers import (
    BestMetric,
    EveryNEpochs,
    EveryNSeconds,
    EveryNSteps,
    StepInfo,
    Trigger,
)
from mlflow_ckpt.manager.worker import BackgroundWorker
from mlflow_ckpt.snapshot import (
    LoadedFolder,
    preserved_python_rng,
    restore,
    take_snapshot,
)
from mlflow_ckpt.snapshot.tree import TensorSink, encode
from mlflow_ckpt.storage import TransferConfig

logger = logging.getLogger(__name__)


@dataclass
class _PendingMetrics:
    step: int
    metrics: dict[str, float]
    timestamp_ms: int


def _positive(name: str, value: float | None, kind: type = int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, kind if kind is int else numbers.Real):
        raise TypeError(f"{name} must be a {kind.__name__}, not {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


def _clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        if not isinstance(key, str):
            raise TypeError(f"metric names must be strings, got {key!r}")
        if hasattr(value, "item") and callable(value.item):
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"metric {key!r} must be a number, not {type(value).__name__}")
        out[key] = float(value)
    return out


def _check_state(state: Mapping[str, Any]) -> None:
    """Fail at construction, not hours later, if something in the state can't be saved."""
    if not isinstance(state, Mapping) or not state:
        raise TypeError(
            "state must be a non-empty dict of name -> object, e.g. "
            "{'model': model, 'optimizer': optimizer}"
        )
    sink = TensorSink(lambda t: t)
    for name, obj in state.items():
        if not isinstance(name, str) or not name or name.startswith("_"):
            raise ValueError(
                f"state names must be non-empty strings not starting with '_': {name!r}"
            )
        encode(obj, name, sink)


class CheckpointManager:
    """Saves the whole training state as MLflow LoggedModels and resumes from them.

    ``state`` maps names to objects with ``state_dict()``/``load_state_dict()`` (modules,
    optimizers, schedulers, ``GradScaler``, samplers...), ``torch.Generator``/``random.Random``
    /NumPy generators, tensors, or nested dicts/lists of tensors and numbers. The global
    Python, NumPy and torch (CPU and CUDA) random streams are added automatically.

    Call :meth:`step` after each finished step (0-based): it saves when a trigger is due and
    logs the step's metrics to the run. See the README for the full tour.

    Beyond triggers, retention and format: ``on_error="warn"`` keeps training through failed
    saves (default ``"raise"``); ``force=True`` takes the run's writer lease from another live
    process, ``lease_ttl`` sets its expiry; ``log_metrics=False`` uses metrics for triggers
    and checkpoint links only, for when something else (MLflow's autolog) logs them;
    ``transfer`` tunes remote uploads; ``max_shard_bytes`` bounds tensor files;
    ``code_paths`` are copied into each checkpoint for the pyfunc flavor.
    """

    def __init__(
        self,
        state: Mapping[str, Any],
        *,
        run_id: str | None = None,
        save_every_n_steps: int | None = None,
        save_every_n_epochs: int | None = None,
        save_every_n_seconds: float | None = None,
        monitor: str | None = None,
        mode: str = "min",
        keep_last_n: int | None = None,
        keep_best_n: int | None = None,
        keep_every_n_steps: int | None = None,
        save_last: bool = True,
        format: str = "safetensors",
        async_save: bool = True,
        model_factory: Callable[..., Any] | str | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        code_paths: Sequence[str | Path] = (),
        transfer: TransferConfig | None = None,
        client: MlflowClient | None = None,
        log_metrics: bool = True,
        on_error: str = "raise",
        force: bool = False,
        lease_ttl: float = DEFAULT_TTL_S,
        _lease: WriterLease | None = None,
    ) -> None:
        _positive("save_every_n_steps", save_every_n_steps)
        _positive("save_every_n_epochs", save_every_n_epochs)
        _positive("save_every_n_seconds", save_every_n_seconds, float)
        _positive("max_shard_bytes", max_shard_bytes)
        _positive("keep_last_n", keep_last_n)
        _positive("keep_best_n", keep_best_n)
        _positive("keep_every_n_steps", keep_every_n_steps)
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', not {mode!r}")
        if on_error not in ("raise", "warn"):
            raise ValueError(f"on_error must be 'raise' or 'warn', not {on_error!r}")
        _positive("lease_ttl", lease_ttl, float)
        check_format(format)
        try:
            kwargs = json.loads(json.dumps(dict(model_kwargs or {}), allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"model_kwargs must be JSON-serialisable: {exc}") from exc
        _check_state(state)
        self.retention: RetentionPolicy | None = build_policy(
            keep_last_n=keep_last_n,
            keep_best_n=keep_best_n,
            keep_every_n_steps=keep_every_n_steps,
            metric=monitor,
            mode=mode,
        )

        spec = flavor.FolderSpec(  # validated before the lease is taken: nothing to undo
            format=format,
            max_shard_bytes=max_shard_bytes,
            model_factory=flavor.factory_path(model_factory),
            model_kwargs=kwargs,
            code_paths=tuple(str(p) for p in code_paths),
        )
        self.state = state
        self.client = client or MlflowClient()
        with preserved_python_rng():
            if run_id is None:
                active = mlflow.active_run()
                if active is None:
                    raise NoActiveRunError(
                        "CheckpointManager needs an MLflow run: call it inside "
                        "`with mlflow.start_run():`, pass run_id=..., or continue an earlier "
                        "run with CheckpointManager.resume(run_id, state)."
                    )
                run_id = active.info.run_id
            run = get_run(self.client, run_id)
            if _lease is None:
                _lease = _take_run(self.client, run, force=force, ttl=lease_ttl)
        self._lease = _lease
        self.run_id: str = run.info.run_id
        self.experiment_id: str = run.info.experiment_id
        self.on_error = on_error
        self._target = WriteTarget(
            client=self.client,
            run_id=self.run_id,
            experiment_id=self.experiment_id,
            spec=spec,
            transfer=transfer,
            check_writer=_lease.check,
            writer_id=_lease.owner,
            log_metrics=log_metrics,
        )
        self.format = format
        self.async_save = async_save
        self.save_last = save_last
        self.monitor = monitor
        # False when something else (the user, mlflow autolog) already logs these metrics:
        # they then only drive triggers/retention and are linked to the saved checkpoints.
        self.log_metrics = log_metrics
        self.triggers: list[Trigger] = []
        if save_every_n_steps:
            self.triggers.append(EveryNSteps(save_every_n_steps))
        if save_every_n_epochs:
            self.triggers.append(EveryNEpochs(save_every_n_epochs))
        if save_every_n_seconds:
            self.triggers.append(EveryNSeconds(float(save_every_n_seconds)))
        if monitor:
            self.triggers.append(BestMetric(monitor, mode))

        self.start_step = 0
        self.start_epoch = 0
        self.resumed_from: Checkpoint | None = None
        self.last_checkpoint: Checkpoint | None = None
        self._resumes = 0
        self._last_step: int | None = None
        self._last_epoch: int | None = None
        self._last_saved_step: int | None = None
        self._last_save_time = time.monotonic()
        self._pending: _PendingMetrics | None = None
        self._already_logged: set[tuple[str, int]] = set()
        self._closed = False
        self._worker = BackgroundWorker(f"mlflow-ckpt-{self.run_id[:8]}") if async_save else None
        atexit.register(self._flush_at_exit)

    # ------------------------------------------------------------------ training loop API

    def step(
        self,
        step: int,
        metrics: Mapping[str, Any] | None = None,
        epoch: int | None = None,
        *,
        end_of_epoch: bool = False,
        timestamp_ms: int | None = None,
    ) -> bool:
        """Record finished step ``step`` (0-based): log ``metrics``, save if a trigger is due.

        Pass ``end_of_epoch=True`` on the last step of an epoch for ``save_every_n_epochs``.
        ``timestamp_ms`` stamps the metrics (default: now); autolog passes the timestamp of
        the loop's own ``mlflow.log_metric`` so MLflow keeps one history entry, not two.
        Returns whether a save was started. In async mode it returns once the state is
        copied to host memory.
        """
        self._check_usable()
        self._check_step(step, epoch)
        clean = _clean_metrics(metrics)
        now = time.monotonic()
        info = StepInfo(step, epoch, clean, end_of_epoch, now, self._last_save_time)
        fired = tuple(t.name for t in self.triggers if t.fires(info))
        for trigger in self.triggers:
            trigger.observe(info)
        self._flush_metrics()
        self._last_step, self._last_epoch = step, epoch
        now_ms = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
        self._pending = _PendingMetrics(step, clean, now_ms)
        if fired:
            self._save(step, epoch, fired, end_of_epoch=end_of_epoch)
        return bool(fired)

    def save(
        self, step: int, metrics: Mapping[str, Any] | None = None, epoch: int | None = None
    ) -> bool:
        """Save ``step`` now (trigger ``manual``), unless it is already saved.

        ``metrics`` are logged at ``step`` and linked to the checkpoint, merged with those
        given to :meth:`step` for the same step.
        """
        self._check_usable()
        clean = _clean_metrics(metrics)
        if self._pending is not None and self._pending.step == step:
            self._pending.metrics.update(clean)
        else:
            self._check_step(step, epoch)
            self._flush_metrics()
            self._last_step, self._last_epoch = step, epoch
            self._pending = _PendingMetrics(step, clean, int(time.time() * 1000))
        if step == self._last_saved_step:
            logger.info("Step %d of run %s is already saved", step, self.run_id)
            return False
        self._save(step, epoch, ("manual",), end_of_epoch=False)
        return True

    def wait(self) -> None:
        """Block until every pending save and metric is committed; raise a background error."""
        self._flush_metrics()
        if self._worker is not None:
            self._worker.drain()
        self._raise_background_error()

    def close(self) -> None:
        """Save the last step if asked (``save_last``), wait for everything, stop the worker."""
        if self._closed:
            return
        try:
            if self._worker is not None:
                self._worker.wait_for_saves()  # a failing last save must be seen before...
            self._raise_background_error()
            if (  # ...deciding whether the last step still needs saving
                self.save_last
                and self._last_step is not None
                and self._last_step != self._last_saved_step
            ):
                self._save(self._last_step, self._last_epoch, ("last",), end_of_epoch=False)
            self.wait()
            if self.retention is not None:
                apply_retention(self.client, self.run_id, self.retention)
        finally:
            self._shutdown()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.wait()  # keep what was already saved; don't snapshot a failed state
        except CheckpointError:
            logger.exception("Pending checkpoint work failed while handling another error")
        finally:
            self._shutdown()

    @property
    def writer_id(self) -> str:
        """This process's writer-lease ID, also tagged on every checkpoint it writes."""
        return self._lease.owner

    @property
    def best_value(self) -> float | None:
        """Best value of ``monitor`` seen so far (across resumes), if monitoring."""
        for trigger in self.triggers:
            if isinstance(trigger, BestMetric):
                return trigger.best
        return None

    # ------------------------------------------------------------------ internals

    def _check_usable(self) -> None:
        if self._closed:
            raise CheckpointError(f"CheckpointManager for run {self.run_id} is closed")
        if self._lease.lost_to is not None:
            self._lease.check()  # another process owns the run now: stop before logging
        self._raise_background_error()

    def _check_step(self, step: int, epoch: int | None) -> None:
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"step must be a non-negative int (0-based), got {step!r}")
        if epoch is not None and (
            isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral)
        ):
            raise ValueError(f"epoch must be an int or None, got {epoch!r}")
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(
                f"step {step} does not come after step {self._last_step} already recorded for "
                f"run {self.run_id}; steps are 0-based indices of finished steps and must "
                f"increase (after a resume, start at manager.start_step = {self.start_step})."
            )

    def _raise_background_error(self) -> None:
        error = self._worker.take_error() if self._worker is not None else None
        if error is not None:
            self._failed(error)

    def _failed(self, error: BaseException) -> None:
        """Raise a failed save's error, or only warn about it with ``on_error="warn"``.

        A lost writer lease always raises: going on would write a run another process owns.
        """
        if self.on_error == "warn" and isinstance(error, CheckpointWriteError):
            logger.warning("%s", error)
            warnings.warn(f"{error} Training goes on (on_error='warn').", stacklevel=4)
            return
        raise error

    def _manager_state(self) -> dict[str, Any]:
        return {
            "triggers": {t.name: t.state_dict() for t in self.triggers},
            "resumes": self._resumes,
        }

    def _save(
        self, step: int, epoch: int | None, triggers: Iterable[str], *, end_of_epoch: bool
    ) -> None:
        if self._worker is not None:
            self._worker.wait_for_saves()  # one save in flight: at most one extra host copy
            self._raise_background_error()
        pending = self._pending if self._pending and self._pending.step == step else None
        self._pending = None
        metrics = pending.metrics if pending else {}
        progress = {
            "step": step,
            "epoch": epoch,
            "end_of_epoch": end_of_epoch,
            "metrics": metrics,
            "manager": self._manager_state(),
        }
        snapshot = take_snapshot(self.state, progress, copy=self._worker is not None)
        job = SaveJob(
            snapshot=snapshot,
            step=step,
            epoch=epoch,
            metrics=metrics,
            triggers=tuple(triggers),
            timestamp_ms=pending.timestamp_ms if pending else int(time.time() * 1000),
            previous_step=self.last_checkpoint.step if self.last_checkpoint else None,
        )
        self._last_saved_step = step
        self._last_save_time = time.monotonic()
        if self._worker is None:
            try:
                self._run_save(job)
            except CheckpointError as exc:
                self._failed(exc)
        else:
            self._worker.submit(lambda: self._run_save(job), is_save=True)

    def _run_save(self, job: SaveJob) -> None:
        """Write and commit one checkpoint, then apply retention (on the worker if async)."""
        try:
            self.last_checkpoint = write_checkpoint(self._target, job)
        except CheckpointError:
            if self._last_saved_step == job.step:  # let save_last retry this step at close
                self._last_saved_step = self.last_checkpoint.step if self.last_checkpoint else None
            raise
        del job
        if self.retention is not None:
            apply_retention(self.client, self.run_id, self.retention)

    def _flush_metrics(self) -> None:
        """Log the pending step's metrics (not linked to a checkpoint)."""
        pending, self._pending = self._pending, None
        if pending is None or not self.log_metrics:
            return
        metrics = {
            k: v
            for k, v in pending.metrics.items()
            if (k, pending.step) not in self._already_logged
        }
        if not metrics:
            return
        entities = models.metric_entities(
            metrics, step=pending.step, timestamp_ms=pending.timestamp_ms
        )

        def log() -> None:
            try:
                self.client.log_batch(self.run_id, metrics=entities)
            except Exception as exc:  # a tracking outage: on_error decides, like failed saves
                raise CheckpointWriteError(
                    f"Logging the metrics of step {pending.step} to run {self.run_id} in "
                    f"{self.client.tracking_uri} failed ({type(exc).__name__}: {exc}). "
                    "Checkpoints are not affected."
                ) from exc

        if self._worker is None:
            try:
                log()
            except CheckpointWriteError as exc:
                self._failed(exc)
        else:
            self._worker.submit(log, is_save=False)

    def _shutdown(self) -> None:
        self._closed = True
        atexit.unregister(self._flush_at_exit)
        if self._worker is not None:
            self._worker.stop()
        self._lease.release()

    def _flush_at_exit(self) -> None:
        """At interpreter exit, commit pending saves and metrics (no new snapshot is taken)."""
        if self._closed:
            return
        try:
            self.wait()
        except Exception:
            logger.exception("Pending checkpoint work for run %s failed at exit", self.run_id)
        finally:
            self._shutdown()

    def _restore_progress(self, ckpt: Checkpoint, progress: Mapping[str, Any]) -> None:
        manager_state = progress.get("manager") or {}
        saved_triggers = manager_state.get("triggers") or {}
        for trigger in self.triggers:
            if trigger.name in saved_triggers:
                trigger.load_state_dict(dict(saved_triggers[trigger.name]))
        self._resumes = int(manager_state.get("resumes", 0)) + 1
        self.resumed_from = ckpt
        self.last_checkpoint = ckpt
        self.start_step = ckpt.step + 1
        epoch = progress.get("epoch")
        if epoch is not None:
            self.start_epoch = int(epoch) + (1 if progress.get("end_of_epoch") else 0)
        self._last_step = ckpt.step
        self._last_epoch = epoch
        self._last_saved_step = ckpt.step

    # ------------------------------------------------------------------ resume

    @classmethod
    def resume(
        cls,
        run_id: str,
        state: Mapping[str, Any],
        *,
        strict: bool = True,
        **kwargs: Any,
    ) -> CheckpointManager:
        """Continue run ``run_id``: restore the newest checkpoint that verifies, reopen the run.

        Checkpoints whose files fail verification are skipped with a warning and tagged
        ``mlflow_ckpt.status=corrupt``. With no checkpoint the state is left as it is and
        ``start_step`` is 0. ``strict`` refuses checkpoint entries missing from ``state``.
        Other keyword arguments are those of the constructor.
        """
        client: MlflowClient = kwargs.get("client") or MlflowClient()
        kwargs["client"] = client
        _check_state(state)
        with preserved_python_rng():
            run = get_run(client, run_id)
            lease = _take_run(
                client,
                run,
                force=kwargs.pop("force", False),
                ttl=kwargs.pop("lease_ttl", DEFAULT_TTL_S),
            )
        try:
            return cls._resume_holding(run, state, lease, strict=strict, **kwargs)
        except BaseException:
            lease.release()
            raise

    @classmethod
    def _resume_holding(
        cls,
        run: Any,
        state: Mapping[str, Any],
        lease: WriterLease,
        *,
        strict: bool,
        **kwargs: Any,
    ) -> CheckpointManager:
        """:meth:`resume` once this process holds the run's writer lease."""
        run_id = run.info.run_id
        client: MlflowClient = kwargs["client"]
        chosen: Checkpoint | None = None
        loaded: LoadedFolder | None = None
        for ckpt in list_checkpoints(run_id, client=client):
            try:
                model = resolve(ckpt, client)
                loaded = read_checkpoint(model)
            except (CheckpointCorruptedError, CheckpointNotFoundError) as exc:
                warnings.warn(
                    f"Skipping checkpoint {ckpt.uri} (step {ckpt.step}) of run {run_id}: {exc}",
                    stacklevel=2,
                )
                if isinstance(exc, CheckpointCorruptedError):
                    models.mark_corrupt(client, ckpt.model_id)
                continue
            chosen = ckpt
            break
        if chosen is not None and loaded is not None:
            # Restoring is all-or-nothing and comes before any write to the run, so a
            # mismatch leaves both the objects and the run untouched.
            restore(
                loaded.decoded,
                state,
                strict=strict,
                restore_rng_streams=True,
                where=describe(model),  # the model the loop verified
            )
        # From here on the user's random streams are restored: MLflow calls must not move them.
        with preserved_python_rng():
            active = mlflow.active_run()
            if active is None:
                mlflow.start_run(run_id=run_id)
            elif active.info.run_id != run_id:
                raise CheckpointError(
                    f"Cannot resume run {run_id}: run {active.info.run_id} is active in this "
                    "process. End it first (mlflow.end_run())."
                )
            manager = cls(state, run_id=run_id, _lease=lease, **kwargs)
            if chosen is not None and loaded is not None:
                manager._restore_progress(chosen, loaded.decoded.progress)
            else:
                manager._resumes = 1
            manager._already_logged = {
                (key, step)
                for key, step in logged_pairs(client, run_id)
                if step >= manager.start_step
            }
            client.set_tag(run_id, tags.RUN_RESUMES, str(manager._resumes))
            client.set_tag(run_id, tags.RUN_RESUMED_FROM, chosen.uri if chosen else "")
        logger.info(
            "Resumed run %s from %s; training continues at step %d",
            run_id,
            chosen.uri if chosen else "scratch",
            manager.start_step,
        )
        return manager


def _take_run(client: MlflowClient, run: Any, *, force: bool, ttl: float) -> WriterLease:
    """Acquire the run's writer lease, then clean up after killed writers.

    Only the lease holder may recover: with the lease, no other process is mid-save. A lease
    this process already held (an earlier manager in it) may have saves in flight: no recovery.
    """
    lease = WriterLease.acquire(client, run.info.run_id, force=force, ttl=ttl)
    if not lease.inherited:
        try:
            recover_run(client, run)
        except BaseException:
            lease.release()
            raise
    return lease

"""PyTorch Lightning integration: :class:`MlflowCheckpoint`, a Callback checkpointing to MLflow.

Each checkpoint holds Lightning's own full checkpoint dict (``dump_checkpoint``: weights,
loops, callbacks, optimizers, LR schedulers, precision plugin, hyper-parameters) plus the
global random streams, so ``trainer.fit(model, ckpt_path=mlflow_ckpt.resume_path(run_id))``
continues exactly where the run stopped, in the same MLflow run.

Importing this module imports Lightning (``lightning.pytorch``, else ``pytorch_lightning``);
``pip install 'mlflow-ckpt[lightning]'`` installs it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from mlflow_ckpt.integrations.framework_run import (
    FrameworkRun,
    HoldsFrameworkRun,
    callback_kwargs,
    runs_on_every_rank,
    saves_within_epochs,
)
from mlflow_ckpt.integrations.framework_state import (
    LIGHTNING_KEY,
    HeldState,
    numeric_metrics,
    require,
)
from mlflow_ckpt.integrations.loader_state import LoaderGenerators, flatten_loaders
from mlflow_ckpt.integrations.resume_folder import remove_temporary, temporary_root
from mlflow_ckpt.snapshot import capture_rng, restore_rng

logger = logging.getLogger(__name__)


def _lightning_package() -> ModuleType:
    try:
        return require("lightning.pytorch", "lightning")
    except ImportError:
        return require("pytorch_lightning", "lightning")


def _mlflow_logs_metrics(trainer: Any) -> bool:
    """Whether MLflow already receives Lightning's metrics (autolog or an MLFlowLogger)."""
    # (no public way to ask whether an autolog is on; unchanged in MLflow 3.0.0-3.17.2)
    from mlflow.utils.autologging_utils import autologging_is_disabled

    if not autologging_is_disabled("pytorch"):
        return True
    return any(type(lg).__name__ == "MLFlowLogger" for lg in getattr(trainer, "loggers", []))


class _MlflowCheckpointHooks(HoldsFrameworkRun):
    """Everything :class:`MlflowCheckpoint` does, apart from which ``Callback`` it derives from.

    Defined once at module level (not inside :func:`_make_callback_class`) so each hook is a
    plain method of its own, and the class per Lightning package only adds the base class.
    It must come before ``Callback`` in the bases: ``Callback``'s hooks are no-ops that
    these override.
    """

    state_key: str  # Lightning's Callback property (the built class's second base)

    def __init__(self, *, log_metrics: bool | None = None, **manager_kwargs: Any) -> None:
        super().__init__()
        self.manager_kwargs = callback_kwargs("MlflowCheckpoint", manager_kwargs)
        self.log_metrics = log_metrics
        self._run = FrameworkRun(self.manager_kwargs, resume_from="ckpt_path", call="fit")
        self._resume_run_id: str | None = None
        self._resume_global_step = 0
        self._seen: dict[str, float] = {}  # metric values already given to the manager
        self._last_step = -1
        self._failed = False
        self._rng_before_sanity: dict[str, Any] | None = None
        self._loaders: LoaderGenerators | None = None  # the train loaders' generators

    # ---------------------------------------------------------- Lightning's own state

    def state_dict(self) -> dict[str, Any]:
        """Stored in Lightning's checkpoint: which MLflow run a resume must continue."""
        return {"run_id": self.run_id}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self._resume_run_id = state_dict.get("run_id") or self._resume_run_id

    # ---------------------------------------------------------- hooks

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Resuming: reopen the checkpoint's run before Lightning builds its data iterators.

        The manager restores the random streams here, early enough that the first
        dataloader iterator of the resumed fit draws from them, as the straight run did.
        """
        saved = (checkpoint.get("callbacks") or {}).get(self.state_key) or {}
        self._resume_run_id = saved.get("run_id") or None
        self._resume_global_step = int(checkpoint.get("global_step", 0))
        if self._resume_run_id and self._writes_here(trainer) and self.manager is None:
            self._open(trainer, pl_module)

    def on_sanity_check_start(self, trainer: Any, pl_module: Any) -> None:
        # A resumed fit runs a sanity check the straight run had at its very start, before
        # the state we restored was captured: keep it from moving the random streams.
        self._rng_before_sanity = capture_rng() if self._resume_run_id else None

    def on_sanity_check_end(self, trainer: Any, pl_module: Any) -> None:
        if self._rng_before_sanity is not None:
            restore_rng(self._rng_before_sanity)
            self._rng_before_sanity = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self._writes_here(trainer) and self.manager is None:
            self._open(trainer, pl_module)
        self._drop_resume_folder(trainer)
        self._restore_loader_order(trainer)

    def _restore_loader_order(self, trainer: Any) -> None:
        """Give the train loaders the generator states restored at ``on_load_checkpoint``
        (the loaders did not exist then). Lightning has already made the first epoch's
        iterator, which drew its base seed from the fresh generator: drawn again."""
        if self._loaders is None or not self._loaders.pending:
            return
        loaders = flatten_loaders(trainer.train_dataloader)
        if any(getattr(d, "num_workers", 0) for d in loaders):
            logger.warning(
                "Lightning starts the train loader's workers for the first resumed epoch "
                "before any callback can restore the loader's generator: with "
                "num_workers > 0 the resumed data order differs from the uninterrupted "
                "run's (num_workers=0, or a sampler seeded per epoch, keeps it)"
            )
        self._loaders.apply_pending(iterators_made=1)

    def _drop_resume_folder(self, trainer: Any) -> None:
        """Remove the temporary folder ``resume_path`` wrote the ``.ckpt`` into: Lightning
        has restored all of it by ``on_train_start``. Ranks may share one folder
        (``ddp_spawn``), so under several ranks all of them have read it first."""
        path = trainer.ckpt_path
        folder = temporary_root(Path(path).parent) if isinstance(path, str | Path) else None
        if path and trainer.world_size > 1:
            trainer.strategy.barrier("mlflow_ckpt.resume_folder")
        if folder is not None:
            remove_temporary(folder)

    def _writes_here(self, trainer: Any) -> bool:
        """Every rank under a multi-process strategy (distributed saves), else rank 0."""
        every = runs_on_every_rank(self.manager_kwargs, trainer.world_size)
        return every or trainer.is_global_zero

    def _open(self, trainer: Any, pl_module: Any) -> None:
        connector = trainer._checkpoint_connector
        self._loaders = LoaderGenerators(lambda: trainer.train_dataloader)
        state = {
            "model": pl_module,
            LIGHTNING_KEY: HeldState(lambda: connector.dump_checkpoint(weights_only=False)),
            "train_dataloaders": self._loaders,
        }
        log_metrics = (
            not _mlflow_logs_metrics(trainer) if self.log_metrics is None else self.log_metrics
        )
        every = runs_on_every_rank(self.manager_kwargs, trainer.world_size)
        if self._resume_run_id:
            manager = self._run.resume(
                self._resume_run_id,
                state,
                framework_step=self._resume_global_step,
                log_metrics=log_metrics,
                distributed=every,
            )
        else:
            manager = self._run.open(
                state, leader=trainer.is_global_zero, log_metrics=log_metrics, distributed=every
            )
        self._last_step = manager.start_step - 1

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.manager is None or not saves_within_epochs(self.manager_kwargs):
            return  # epoch-level triggers only: epoch ends are enough
        if batch_idx + 1 >= trainer.num_training_batches:
            return  # the epoch's last step is recorded at epoch end, with its val metrics
        self._record(trainer, end_of_epoch=False)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.manager is not None:
            self._record(trainer, end_of_epoch=True)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.manager is not None:
            self.manager.close()  # waits for uploads, saves the last step if not saved

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._failed = True

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._run.close(failed=self._failed)  # failed: keep what was saved, nothing more
        self._resume_run_id = None
        self._failed = False

    def _record(self, trainer: Any, *, end_of_epoch: bool) -> None:
        assert self.manager is not None
        step = trainer.global_step - 1
        if step <= self._last_step:
            return  # no optimizer step since the last call (gradient accumulation)
        self._last_step = step
        metrics = numeric_metrics(trainer.callback_metrics)
        if not end_of_epoch:  # within an epoch, callback_metrics repeat the last values
            metrics = {k: v for k, v in metrics.items() if self._seen.get(k) != v}
        self._seen.update(metrics)
        self.manager.step(
            step, metrics=metrics, epoch=trainer.current_epoch, end_of_epoch=end_of_epoch
        )


def _make_callback_class(pl: ModuleType) -> type:
    """Build the callback for one package (``lightning.pytorch`` or ``pytorch_lightning``).

    Lightning only accepts callbacks derived from its own ``Callback``, and both packages can
    be installed side by side, so the class is made once per package.
    """

    class MlflowCheckpoint(_MlflowCheckpointHooks, pl.Callback):  # type: ignore[misc, name-defined]
        """Save Lightning's full training state as MLflow checkpoints.

        Under a multi-process strategy (``"ddp"``...) it runs on every rank and saves like
        a distributed :class:`~mlflow_ckpt.CheckpointManager` (the model and optimizer
        sharded through DCP, each rank's random streams its own); ``distributed=False``
        keeps it on global rank 0 alone.

        Keyword arguments are those of :class:`mlflow_ckpt.CheckpointManager`
        (``save_every_n_steps``, ``save_every_n_epochs``, ``monitor``, ``mode``,
        ``keep_last_n``, ``keep_best_n``, ``model_factory``...). Without any trigger it saves
        at the end of every epoch. ``monitor`` names a metric in ``trainer.callback_metrics``
        (what ``self.log`` records, e.g. ``"val_loss"``). ``log_metrics`` says whether the
        callback logs those metrics to the run itself; by default it does unless
        ``mlflow.pytorch.autolog()`` or an ``MLFlowLogger`` already does, so nothing is logged
        twice (saved checkpoints still get the values linked).

        Steps are 0-based finished optimizer steps (``trainer.global_step - 1``). The run is
        the active MLflow run, or one the callback starts (and ends after ``fit``); when
        resuming from :func:`mlflow_ckpt.resume_path` it is the checkpoint's own run.
        """

    MlflowCheckpoint.__module__ = __name__
    MlflowCheckpoint.__qualname__ = "MlflowCheckpoint"  # Lightning's state_key
    return MlflowCheckpoint


_CLASSES: dict[str, type] = {}


def callback_class(package: ModuleType) -> type:
    """The :class:`MlflowCheckpoint` class deriving from ``package.Callback``."""
    name = package.__name__
    if name not in _CLASSES:
        _CLASSES[name] = _make_callback_class(package)
    return _CLASSES[name]


# (a class made at import, deriving from whichever Lightning package is installed)
MlflowCheckpoint: type = callback_class(_lightning_package())

__all__ = ["MlflowCheckpoint", "callback_class"]

"""``fork``: a new run that goes on from any checkpoint, its charts continuing the source's.

The use: a loss spike at step 40k, so go back to the checkpoint pinned before it, lower the
learning rate and train on as a new branch, leaving the run that spiked as it was. The fork
is an MLflow run nested under the source (:mod:`mlflow_ckpt.catalog.lineage` makes it and
says how a half-made one is handled); training then continues through the ordinary resume
(``CheckpointManager.resume`` of the fork run restores the checkpoint it branched off), so
a fork continues bit for bit exactly as a resume does, on any world size.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import mlflow
import torch
from mlflow import MlflowClient

from mlflow_ckpt.catalog import Checkpoint
from mlflow_ckpt.catalog.lineage import Fork, create_fork
from mlflow_ckpt.errors import CheckpointError
from mlflow_ckpt.manager import CheckpointManager
from mlflow_ckpt.manager.options import build_options, option_arguments
from mlflow_ckpt.snapshot import preserved_python_rng


def fork(
    checkpoint: Checkpoint | str,
    state: Mapping[str, Any],
    *,
    run_name: str | None = None,
    params: Mapping[str, object] | None = None,
    strict: bool = True,
    **manager_kwargs: Any,
) -> CheckpointManager:
    """Start a new run from ``checkpoint`` and return a manager on it, ``state`` restored.

    The new run is created in the source's experiment, nested under the source run
    (``mlflow.parentRunId``), with the source's params (``params`` overrides some: MLflow
    never lets a logged param change, so a fork that lowers the learning rate says so
    here), its user tags, and every metric point up to and including the checkpoint's step,
    timestamps kept; tags ``mlflow_ckpt.forked_from`` (the checkpoint's URI),
    ``mlflow_ckpt.forked_from_run`` and ``mlflow_ckpt.forked_from_step`` name the branch
    point. Then ``state`` is restored from the checkpoint all-or-nothing (RNG streams
    included, ``strict`` as for ``CheckpointManager.resume``) and the returned manager, on
    the new run (now the active run), has ``start_step = step + 1``. The source run and
    its checkpoints are only read. Forking a fork works: lineage is a chain.

    The fork's first save is a full one: none of its checkpoints refers to the source's
    bytes, so the source's retention and ``mlflow gc`` can never break them. Until that
    save the fork resumes from the source checkpoint itself.

    ``manager_kwargs`` are the constructor's (``save_every_n_steps``, ``keep_last_n``...),
    checked before anything is made. In a distributed job make the fork once
    (``mlflow-ckpt fork URI``) and call ``CheckpointManager.resume(fork_run_id, state)``
    on every rank.
    """
    for taken in ("run_id", "resume"):
        if taken in manager_kwargs:
            raise TypeError(f"fork() makes the run it writes; {taken}= cannot be given")
    build_options(option_arguments(inspect.signature(CheckpointManager.__init__), manager_kwargs))
    _check_alone(checkpoint)
    client: MlflowClient = manager_kwargs.get("client") or MlflowClient()
    with preserved_python_rng():
        made = create_fork(client, checkpoint, run_name=run_name, params=params)
    return _resume_fork(made, state, strict, client, manager_kwargs)


def _check_alone(checkpoint: Checkpoint | str) -> None:
    """Refuse what would leave a fork behind that nothing trains: another active run, or
    one rank of many making its own fork."""
    active = mlflow.active_run()
    if active is not None:
        raise CheckpointError(
            f"Cannot fork {_name(checkpoint)}: run {active.info.run_id} is active in this "
            "process and the fork becomes the active run. End it first (mlflow.end_run())."
        )
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise CheckpointError(
            f"fork() runs in one process; every rank would make its own fork of "
            f"{_name(checkpoint)}. Fork once (`mlflow-ckpt fork {_name(checkpoint)}` "
            "prints the new run ID), then call CheckpointManager.resume(run_id, state) "
            "on every rank."
        )


def _name(checkpoint: Checkpoint | str) -> str:
    return checkpoint.uri if isinstance(checkpoint, Checkpoint) else checkpoint


def _resume_fork(
    made: Fork,
    state: Mapping[str, Any],
    strict: bool,
    client: MlflowClient,
    manager_kwargs: dict[str, Any],
) -> CheckpointManager:
    """Restore the branch point through the ordinary resume; a fork whose state does not
    fit is deleted (nothing would ever train it)."""
    run_id = made.run.info.run_id
    try:
        return CheckpointManager.resume(
            run_id, state, strict=strict, **{**manager_kwargs, "client": client}
        )
    except BaseException:
        with preserved_python_rng():
            if (active := mlflow.active_run()) is not None and active.info.run_id == run_id:
                mlflow.end_run("FAILED")
            client.delete_run(run_id)
        raise

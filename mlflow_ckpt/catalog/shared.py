"""The run's shared area: bytes that several incremental checkpoints of a run reference.

Where it lives: ``<run artifact URI>/mlflow_ckpt/shared/<group>/``, one group per checkpoint
that wrote lasting bytes (its model ID). Under the *run*, not under a LoggedModel: retention
deletes LoggedModels, and ``mlflow gc`` then purges their artifacts, which must never take a
byte a kept checkpoint still needs. The area goes when the run itself is deleted and
collected (a promoted checkpoint has copied its bytes into its own folder first).

What keeps a group: every checkpoint carries the groups it references in the tag
:data:`~mlflow_ckpt.catalog.tags.SHARED` (a copy of its manifest's ``@shared/`` files). A
group is deleted only when no checkpoint of the run that may still be read references it:
committed, registered, pinned or marked corrupt ones count, and so does the manager's next
base. The counts are derived from MLflow each time, not kept in a local index, so they hold
after a crash and from the CLI. Only the holder of the run's writer lease deletes, so no
save can be picking references meanwhile; and when a save of the run is still pending
(neither committed nor failed), nothing is deleted at all.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable

from mlflow import MlflowClient
from mlflow.entities import LoggedModel

from mlflow_ckpt.catalog import tags
from mlflow_ckpt.catalog.queries import search_models
from mlflow_ckpt.errors import CheckpointError
from mlflow_ckpt.storage import TransferConfig, open_store, redact

logger = logging.getLogger(__name__)

SHARED_PATH = "mlflow_ckpt/shared"
# A checkpoint in these states is gone or going: its references keep nothing.
_RELEASED = (tags.DELETING, tags.FAILED, tags.INVALID)


def shared_area_uri(run_artifact_uri: str | None) -> str:
    """The shared area of the run whose artifact URI is ``run_artifact_uri``.

    MLflow types a run's artifact URI as optional (``RunInfo.artifact_uri``); every tracking
    store gives one, but a run without it has nowhere to keep checkpoints: a clear error."""
    if run_artifact_uri is None:
        raise CheckpointError(
            "The run has no artifact URI (RunInfo.artifact_uri is None), so it has no shared "
            "area for incremental checkpoints; check the tracking store's artifact location."
        )
    return f"{run_artifact_uri.rstrip('/')}/{SHARED_PATH}"


def references(model: LoggedModel) -> set[str]:
    """The shared groups a checkpoint references (from its tag)."""
    return {g for g in model.tags.get(tags.SHARED, "").split(",") if g}


def delete_groups(
    shared_uri: str, groups: Iterable[str], config: TransferConfig | None = None
) -> list[str]:
    """Delete the given groups of the shared area (best effort); return those deleted."""
    deleted = []
    for group in sorted(set(groups)):
        try:
            with open_store(f"{shared_uri.rstrip('/')}/{group}", config) as store:
                store.delete_all()
        except Exception as exc:  # the next sweep tries again
            logger.warning(
                "Could not delete shared group %s at %s: %s", group, redact(shared_uri), exc
            )
            continue
        deleted.append(group)
    if deleted:
        logger.info(
            "Deleted %d unreferenced shared group(s) at %s", len(deleted), redact(shared_uri)
        )
    return deleted


def release_groups(
    shared_uri: str,
    candidates: Iterable[str],
    live_references: Iterable[Collection[str]],
    protect: Collection[str] = (),
    config: TransferConfig | None = None,
) -> list[str]:
    """Delete those ``candidates`` no live checkpoint references and not in ``protect``.

    The cheap pass after retention deleted some checkpoints: the candidates are the groups
    those referenced, the live references are the writer's own view of the run.
    """
    wanted = set(protect)
    for refs in live_references:
        wanted.update(refs)
    return delete_groups(shared_uri, set(candidates) - wanted, config)


def sweep_shared(
    client: MlflowClient,
    run_id: str,
    experiment_id: str,
    shared_uri: str,
    *,
    protect: Collection[str] = (),
    dry_run: bool = False,
    config: TransferConfig | None = None,
) -> list[str]:
    """The full pass: delete every group of the run's shared area that no checkpoint of the
    run may still need; return the groups deleted (or, with ``dry_run``, to be deleted).

    Call it only while holding the run's writer lease (``gc``, ``close()``).
    """
    try:
        groups = open_store(shared_uri, config).list_folders()
    except Exception as exc:  # nothing is deleted on a partial view
        logger.warning("Shared area %s not swept: %s", redact(shared_uri), exc)
        return []
    if not groups:
        return []
    try:
        models = search_models(client, [experiment_id], f"source_run_id = '{run_id}'")
    except Exception as exc:
        logger.warning(
            "Shared area of run %s not swept: could not list checkpoints (%s)", run_id, exc
        )
        return []
    if any(m.tags.get(tags.STATUS) == tags.PENDING for m in models):
        logger.info(
            "Shared area of run %s not swept: a save is still pending (gc or the next resume "
            "settles it first)",
            run_id,
        )
        return []
    wanted = set(protect)
    for model in models:
        if model.tags.get(tags.STATUS) not in _RELEASED:
            wanted |= references(model)
    unreferenced = sorted(set(groups) - wanted)
    if dry_run:
        return unreferenced
    return delete_groups(shared_uri, unreferenced, config)

"""Making an incremental checkpoint self-contained, before it is promoted.

A registered model version must outlive the run it came from: ``models:/name@alias`` has
to keep loading after every other checkpoint of the run, or the run itself, is deleted and
``mlflow gc`` has run. So before registering, the tensors a checkpoint takes from the run's
shared area are written into its own folder (``promoted/``, exactly those tensors), and its
manifest is swapped for one listing them there (crash-safe: see :mod:`.rewrite`).
"""

from __future__ import annotations

import dataclasses
import logging

from mlflow import MlflowClient
from mlflow.entities import LoggedModel

from mlflow_ckpt.catalog import tags
from mlflow_ckpt.catalog.rewrite import open_committed, reencode, settle, swap_manifest
from mlflow_ckpt.codec.layout import with_shared
from mlflow_ckpt.codec.manifest import is_shared
from mlflow_ckpt.folder.distributed import copy_shared_shards

logger = logging.getLogger(__name__)

PROMOTED_DIR = "promoted"


def make_self_contained(client: MlflowClient, model: LoggedModel) -> bool:
    """Copy the shared tensors of checkpoint ``model`` into its own folder; whether it had
    any. Raises :class:`~mlflow_ckpt.CheckpointCorruptedError` if they do not verify."""
    if not model.tags.get(tags.SHARED) and not model.tags.get(tags.MANIFEST_SHA256_NEXT):
        return False
    with open_committed(model, "promote") as opened:
        own, scratch, manifest, where = opened.own, opened.scratch, opened.manifest, opened.where
        if not manifest.shared_groups:  # a promotion a crash interrupted: finish it
            settle(client, model.model_id, own, scratch, drop_tags=[tags.SHARED])
            return True
        source = with_shared(own, manifest)
        if manifest.world_size:  # DCP shard files: copied, and their metadata re-pointed
            new = copy_shared_shards(own, source, manifest, scratch, where)
        else:
            new = reencode(
                manifest,
                {f.path for f in manifest.files if is_shared(f.path)},
                source=source,
                target=own,
                scratch=scratch,
                where=where,
                directory=PROMOTED_DIR,
                compression=manifest.compression,
            )
            new = dataclasses.replace(new, shared_uri=None, shared_group=None)
        swap_manifest(
            client,
            model.model_id,
            own,
            manifest,
            new,
            scratch,
            set_tags={tags.STORED_BYTES: str(new.stored_bytes)},
            drop_tags=[tags.SHARED],
        )
    logger.info("Made checkpoint %s self-contained (its shared tensors copied in)", where)
    return True

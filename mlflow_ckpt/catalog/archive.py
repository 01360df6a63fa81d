"""The cold tier, in place: ``archive`` and ``unarchive`` one checkpoint.

Old milestones are rarely read but must stay readable. Archiving keeps every URI working:

- on stores with storage classes, each file of the checkpoint's own folder is moved to the
  store's cold class where it lies (S3 ``GLACIER_IR`` by default, or ``STANDARD_IA``:
  both read at once, no restore step; Azure access tier ``Cool`` or ``Cold``; GCS
  ``COLDLINE``, by a rewrite of the object onto itself). Names and bytes do not change.
- on a local folder or an ``mlflow server`` (no classes to ask for), the tensor files are
  recompressed with zstd into ``archive/`` and the manifest is swapped for one listing them
  (crash-safe, see :mod:`.rewrite`).

Files in the run's shared area are left hot: newer checkpoints read them too. The
checkpoint is tagged ``mlflow_ckpt.tier=archive``; listing, best, load, resume and pyfunc
do not care. ``unarchive`` reverses both.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from mlflow import MlflowClient

from mlflow_ckpt.catalog import tags
from mlflow_ckpt.catalog.checkpoint import Checkpoint
from mlflow_ckpt.catalog.resolve import resolve
from mlflow_ckpt.catalog.rewrite import open_committed, reencode, settle, swap_manifest
from mlflow_ckpt.codec import MANIFEST_NAME, Manifest
from mlflow_ckpt.codec.manifest import is_shared
from mlflow_ckpt.errors import CheckpointError
from mlflow_ckpt.storage import Store

logger = logging.getLogger(__name__)

ARCHIVE_DIR = "archive"
# zstd level of a recompressed archive. Measured on fp32 and bf16 weights here (with byte
# planes): level 3 stores 0.807x at 248 MB/s, 12 0.798x at 53 MB/s, 19 0.780x at 6 MB/s;
# a higher level buys about 1% for 40x the time, so it is a choice (``--level``).
DEFAULT_ARCHIVE_LEVEL = 3


def archive_checkpoint(
    checkpoint_or_uri: Checkpoint | str,
    *,
    storage_class: str | None = None,
    level: int = DEFAULT_ARCHIVE_LEVEL,
    client: MlflowClient | None = None,
) -> str:
    """Move one checkpoint to the cold tier in place; return how (a class, or "zstd-N")."""
    client = client or MlflowClient()
    model = resolve(checkpoint_or_uri, client)
    with open_committed(model, "archive") as opened:
        own, scratch, manifest, where = opened.own, opened.scratch, opened.manifest, opened.where
        if own.cold_class is not None:
            chosen = storage_class or own.cold_class
            for path in _own_files(manifest):
                own.set_storage_class(path, chosen)
            client.set_logged_model_tags(
                model.model_id, {tags.TIER: tags.ARCHIVE, tags.STORAGE_CLASS: chosen}
            )
            how = chosen
        else:
            if storage_class:
                raise CheckpointError(
                    f"{where}: its store {type(own).__name__} has no storage classes, so "
                    f"storage_class={storage_class!r} cannot apply; archiving there "
                    "recompresses the tensor files instead (drop the storage class)."
                )
            _recompress(client, model.model_id, own, manifest, scratch, where, level)
            how = f"zstd-{level}"
    logger.info("Archived checkpoint %s (%s)", where, how)
    return how


def unarchive_checkpoint(
    checkpoint_or_uri: Checkpoint | str, *, client: MlflowClient | None = None
) -> None:
    """Bring an archived checkpoint back to the hot tier (its class, or its encoding)."""
    client = client or MlflowClient()
    model = resolve(checkpoint_or_uri, client)
    with open_committed(model, "unarchive") as opened:
        own, scratch, manifest, where = opened.own, opened.scratch, opened.manifest, opened.where
        if tags.STORAGE_CLASS in model.tags and own.hot_class is not None:
            for path in _own_files(manifest):
                own.set_storage_class(path, own.hot_class)
            client.set_logged_model_tags(model.model_id, {tags.TIER: tags.HOT})
            client.delete_logged_model_tag(model.model_id, tags.STORAGE_CLASS)
        elif tags.ARCHIVED_FROM in model.tags:
            before = model.tags[tags.ARCHIVED_FROM]
            compression = None if before == "none" else before
            archived = _archived_files(manifest)
            if archived:
                new = reencode(
                    manifest,
                    archived,
                    source=own,
                    target=own,
                    scratch=scratch,
                    where=where,
                    directory="",
                    compression=compression,
                )
                new = dataclasses.replace(new, compression=compression)
                swap_manifest(
                    client,
                    model.model_id,
                    own,
                    manifest,
                    new,
                    scratch,
                    set_tags={tags.TIER: tags.HOT, tags.STORED_BYTES: str(new.stored_bytes)},
                    drop_tags=[tags.ARCHIVED_FROM],
                )
            else:  # a crash after the swap: finish the tags
                settle(
                    client,
                    model.model_id,
                    own,
                    scratch,
                    set_tags={tags.TIER: tags.HOT},
                    drop_tags=[tags.ARCHIVED_FROM],
                )
        else:
            client.set_logged_model_tags(model.model_id, {tags.TIER: tags.HOT})
    logger.info("Unarchived checkpoint %s", where)


def _own_files(manifest: Manifest) -> list[str]:
    return [*(f.path for f in manifest.files if not is_shared(f.path)), MANIFEST_NAME]


def _archived_files(manifest: Manifest) -> set[str]:
    return {t.file for t in manifest.tensors if t.file.startswith(f"{ARCHIVE_DIR}/")}


def _recompress(
    client: MlflowClient,
    model_id: str,
    own: Store,
    manifest: Manifest,
    scratch: Path,
    where: str,
    level: int,
) -> None:
    """Archive by recompression: the own tensor files become ``archive/*.ztensors``."""
    before = manifest.compression or "none"
    todo = {t.file for t in manifest.tensors if not is_shared(t.file)} - _archived_files(manifest)
    done = {tags.TIER: tags.ARCHIVE}
    if not todo:  # nothing left to recompress (or a crash after the swap): settle the tags
        settle(client, model_id, own, scratch, set_tags=done)
        return
    new = reencode(
        manifest,
        todo,
        source=own,
        target=own,
        scratch=scratch,
        where=where,
        directory=ARCHIVE_DIR,
        compression="zstd",
        level=level,
    )
    new = dataclasses.replace(new, compression="zstd")
    client.set_logged_model_tags(model_id, {tags.ARCHIVED_FROM: before})
    swap_manifest(
        client,
        model_id,
        own,
        manifest,
        new,
        scratch,
        set_tags={**done, tags.STORED_BYTES: str(new.stored_bytes)},
    )

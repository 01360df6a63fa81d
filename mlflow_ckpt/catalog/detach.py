"""Making an incremental checkpoint self-contained, before it is promoted.

A registered model version must outlive the run it came from: ``models:/name@alias`` has
to keep loading after every other checkpoint of the run, or the run itself, is deleted and
``mlflow gc`` has run. So before registering, the tensors a checkpoint takes from the run's
shared area are written into its own folder (``promoted/``, exactly those tensors), and its
manifest is rewritten to list them there.

The manifest is the commit record, and its digest is in the catalog, so the rewrite is a
small protocol that a crash at any point leaves loadable: the new digest is tagged first
(``manifest_sha256_next``; readers accept either), then the manifest is replaced, then the
tags are settled and the shared references dropped. Running it again finishes the job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import tempfile
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import LoggedModel

from mlflow_ckpt.catalog import tags
from mlflow_ckpt.catalog.resolve import describe
from mlflow_ckpt.catalog.runs import get_logged_model
from mlflow_ckpt.codec import (
    MANIFEST_NAME,
    SINGLE_FORMAT_VERSION,
    format_version_for,
    load_files,
    read_manifest,
    read_state,
    write_manifest,
)
from mlflow_ckpt.codec.layout import with_shared, write_shards
from mlflow_ckpt.codec.manifest import is_shared
from mlflow_ckpt.storage import open_store

logger = logging.getLogger(__name__)

PROMOTED_DIR = "promoted"


def make_self_contained(client: MlflowClient, model: LoggedModel) -> bool:
    """Copy the shared tensors of checkpoint ``model`` into its own folder; whether it had
    any. Raises :class:`~mlflow_ckpt.CheckpointCorruptedError` if they do not verify."""
    if not model.tags.get(tags.SHARED) and not model.tags.get(tags.MANIFEST_SHA256_NEXT):
        return False
    where = describe(model)
    with (
        open_store(model.artifact_location) as own,
        tempfile.TemporaryDirectory(prefix="mlflow-ckpt-promote-") as tmp,
    ):
        scratch = Path(tmp)
        manifest = read_manifest(own, scratch, where, tags.manifest_digests(model.tags))
        if manifest.shared_groups:
            shared_files = [f for f in manifest.files if is_shared(f.path)]
            shared_tensors = [t for t in manifest.tensors if is_shared(t.file)]
            structure = manifest.file(manifest.structure_file)
            part = dataclasses.replace(
                manifest, files=(*shared_files, structure), tensors=tuple(shared_tensors)
            )
            store = with_shared(own, manifest)
            _, tensors = read_state(part, load_files(store, part, scratch, where), where)
            written = write_shards(
                own,
                tensors,
                format=manifest.format,
                directory=PROMOTED_DIR,
                compression=manifest.compression,
                digests={t.name: t.digest for t in shared_tensors if t.digest},
            )
            files = (*(f for f in manifest.files if not is_shared(f.path)), *written.files)
            manifest = dataclasses.replace(
                manifest,
                files=files,
                tensors=(
                    *(t for t in manifest.tensors if not is_shared(t.file)),
                    *written.tensors,
                ),
                shared_uri=None,
                shared_group=None,
                format_version=format_version_for(
                    files, SINGLE_FORMAT_VERSION, manifest.compression
                ),
            )
            client.set_logged_model_tags(
                model.model_id, {tags.MANIFEST_SHA256_NEXT: manifest.digest()}
            )
            write_manifest(own, manifest)
            own.flush()
        stored = hashlib.sha256(own.read_bytes(MANIFEST_NAME, scratch)).hexdigest()
    client.set_logged_model_tags(
        model.model_id,
        {tags.MANIFEST_SHA256: stored, tags.STORED_BYTES: str(manifest.stored_bytes)},
    )
    for key in (tags.SHARED, tags.MANIFEST_SHA256_NEXT):
        if key in get_logged_model(client, model.model_id).tags:
            client.delete_logged_model_tag(model.model_id, key)
    logger.info("Made checkpoint %s self-contained (its shared tensors copied in)", where)
    return True

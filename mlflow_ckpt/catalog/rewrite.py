"""Rewriting a committed checkpoint in place: some tensor files re-encoded, a new manifest.

Promotion (copying shared bytes in) and archiving on a store without storage classes
(recompressing) change which files a committed checkpoint lists. The manifest is the commit
record and its digest is in the catalog, so the swap follows one crash-safe order: the new
manifest's digest is tagged first (``manifest_sha256_next``; readers accept either digest),
then the manifest is replaced, then the tags are settled. Files the new manifest no longer
lists are deleted last; a crash leaves them as unlisted leftovers, never as a missing file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import LoggedModel

from mlflow_ckpt.catalog import tags
from mlflow_ckpt.catalog.resolve import describe
from mlflow_ckpt.catalog.runs import get_logged_model
from mlflow_ckpt.codec import (
    MANIFEST_NAME,
    SINGLE_FORMAT_VERSION,
    Manifest,
    format_version_for,
    load_files,
    read_manifest,
    read_state,
    write_manifest,
)
from mlflow_ckpt.codec.shards import write_shards
from mlflow_ckpt.storage import TEMP_MARKER, Store, open_store
from mlflow_ckpt.storage.staging import scratch_dir

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Opened:
    """A committed checkpoint opened for a rewrite: its folder, a scratch directory and its
    manifest (checked against the catalog's digests)."""

    own: Store
    scratch: Path
    manifest: Manifest
    where: str


@contextlib.contextmanager
def open_committed(model: LoggedModel, purpose: str) -> Iterator[Opened]:
    """Open ``model``'s folder and read its manifest; closed (scratch removed) on exit."""
    where = describe(model)
    with (
        open_store(model.artifact_location) as own,
        scratch_dir(purpose) as scratch,
    ):
        manifest = read_manifest(own, scratch, where, tags.manifest_digests(model.tags))
        yield Opened(own, scratch, manifest, where)


def reencode(
    manifest: Manifest,
    files: Collection[str],
    *,
    source: Store,
    target: Store,
    scratch: Path,
    where: str,
    directory: str,
    compression: str | None,
    level: int = 1,
) -> Manifest:
    """The manifest of the checkpoint with the tensors of ``files`` (verified on the way)
    written anew as shards under ``directory`` of ``target`` (exactly the tensors it uses)."""
    chosen = set(files)
    entries = tuple(t for t in manifest.tensors if t.file in chosen)
    part = dataclasses.replace(
        manifest,
        files=(*(manifest.file(f) for f in sorted(chosen)), manifest.file(manifest.structure_file)),
        tensors=entries,
    )
    _, tensors = read_state(part, load_files(source, part, scratch, where), where)
    written = write_shards(
        target,
        {t.name: tensors[t.name] for t in entries},
        format=manifest.format,
        directory=directory,
        compression=compression,
        compression_level=level,
        digests={t.name: t.digest for t in entries if t.digest},
    )
    kept = tuple(f for f in manifest.files if f.path not in chosen)
    new_files = (*kept, *written.files)
    return dataclasses.replace(
        manifest,
        files=new_files,
        tensors=(*(t for t in manifest.tensors if t.file not in chosen), *written.tensors),
        format_version=format_version_for(new_files, SINGLE_FORMAT_VERSION, compression),
    )


def swap_manifest(
    client: MlflowClient,
    model_id: str,
    own: Store,
    old: Manifest,
    new: Manifest,
    scratch: Path,
    *,
    set_tags: Mapping[str, str] | None = None,
    drop_tags: Collection[str] = (),
) -> None:
    """Replace a committed checkpoint's manifest by ``new`` (crash-safe, see the module),
    then delete the files only ``old`` listed."""
    client.set_logged_model_tags(model_id, {tags.MANIFEST_SHA256_NEXT: new.digest()})
    write_manifest(own, new)
    own.flush()
    settle(client, model_id, own, scratch, set_tags=set_tags, drop_tags=drop_tags)
    listed = {f.path for f in new.files}
    for entry in old.files:
        if entry.path not in listed and not entry.path.startswith("@"):
            own.delete(entry.path)


def _remove_temporary(own: Store, manifest: Manifest) -> None:
    """Delete local temporary files (a killed writer's) in the folders the manifest lists
    files in. Remote stores have none: their objects appear whole or not at all."""
    folders = {"", *(p.rpartition("/")[0] for p in (f.path for f in manifest.files))}
    for folder in sorted(f for f in folders if not f.startswith("@")):
        try:
            names = own.list_sizes(folder)
        except NotImplementedError:
            return
        for name in names:
            if name.startswith(TEMP_MARKER):
                own.delete(f"{folder}/{name}" if folder else name)


def settle(
    client: MlflowClient,
    model_id: str,
    own: Store,
    scratch: Path,
    *,
    set_tags: Mapping[str, str] | None = None,
    drop_tags: Collection[str] = (),
) -> None:
    """Record the stored manifest's digest as the checkpoint's and finish the tags (also
    what finishes a swap a crash interrupted), then remove the temporary files a rewrite
    killed mid-file left in the folder."""
    data = own.read_bytes(MANIFEST_NAME, scratch)
    _remove_temporary(own, Manifest.from_json(data, model_id))
    digest = hashlib.sha256(data).hexdigest()
    client.set_logged_model_tags(model_id, {tags.MANIFEST_SHA256: digest, **(set_tags or {})})
    present = get_logged_model(client, model_id).tags
    for key in (tags.MANIFEST_SHA256_NEXT, *drop_tags):
        if key in present:
            client.delete_logged_model_tag(model_id, key)

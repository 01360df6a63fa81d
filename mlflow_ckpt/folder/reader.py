"""Read a whole checkpoint folder from a store: manifest, verification, decoding."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mlflow_ckpt.codec import Manifest, load_files, read_manifest, read_state
from mlflow_ckpt.codec.layout import with_shared
from mlflow_ckpt.snapshot import DecodedState, decode_document
from mlflow_ckpt.storage import Store


@dataclass(frozen=True)
class LoadedFolder:
    """A verified, decoded checkpoint folder."""

    manifest: Manifest
    decoded: DecodedState


def read_folder(
    store: Store,
    scratch: Path,
    where: str,
    manifest_sha256: str | Sequence[str] | None = None,
    planar: Callable[[str], bool] | None = None,
) -> LoadedFolder:
    """Verify every file of the folder against its manifest, then decode the state.

    ``planar``: the compressed tensors a restore will interleave into live tensors itself
    (:mod:`mlflow_ckpt.snapshot.direct`); a checkpoint written by several ranks ignores it.

    Raises ``FileNotFoundError`` when there is no manifest (the save never committed) and
    :class:`~mlflow_ckpt.CheckpointCorruptedError` naming the first bad file.
    """
    manifest = read_manifest(store, scratch, where, manifest_sha256)
    store = with_shared(store, manifest)  # an incremental checkpoint's shared files
    if manifest.world_size:  # written by several ranks: assemble the full state
        from mlflow_ckpt.folder.distributed import read_distributed

        return LoadedFolder(manifest, read_distributed(store, manifest, scratch, where))
    local = load_files(store, manifest, scratch, where)
    document, tensors = read_state(manifest, local, where, planar)
    return LoadedFolder(manifest, decode_document(document, tensors, where))

"""Rebuild a checkpoint's network: the one loader behind every ``load_model`` path.

``mlflow_ckpt.load_model(uri)``, the flavor's ``load_model(path_or_uri)``, pyfunc's
``_load_pyfunc`` and ONNX export all end in :func:`load_folder_model`: verify every file of
the folder, read the factory from the verified ``MLmodel``, make the folder's own ``code/``
importable, build the network and restore ``state["model"]`` into it.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mlflow_ckpt.codec import verify_files
from mlflow_ckpt.errors import CheckpointCorruptedError, CheckpointError
from mlflow_ckpt.folder.factory import import_factory
from mlflow_ckpt.folder.mlmodel import CODE_DIR, MODEL_KEY, flavor_config
from mlflow_ckpt.folder.reader import LoadedFolder, read_folder
from mlflow_ckpt.snapshot import restore
from mlflow_ckpt.storage import Store
from mlflow_ckpt.storage.staging import scratch_dir

MLMODEL = "MLmodel"


def build_model(
    config: Mapping[str, Any], loaded: LoadedFolder, where: str, code_dir: Path | None = None
) -> torch.nn.Module:
    """Rebuild ``state["model"]`` of a checkpoint with its recorded factory, in eval mode."""
    path = config.get("model_factory")
    if not path:
        raise CheckpointError(
            f"Checkpoint {where} has no model factory, so its network cannot be rebuilt. "
            "Pass model_factory= (and JSON model_kwargs=) to CheckpointManager, or restore "
            "into a model you build: mlflow_ckpt.load(uri, {'model': model})."
        )
    model = import_factory(path, code_dir)(**dict(config.get("model_kwargs") or {}))
    if not isinstance(model, torch.nn.Module):
        raise CheckpointError(f"Model factory {path!r} returned {type(model).__name__}")
    restore(
        loaded.decoded, {MODEL_KEY: model}, strict=False, restore_rng_streams=False, where=where
    )
    return model.eval()


def load_folder_model(
    store: Store, where: str, manifest_sha256: str | Sequence[str] | None = None
) -> torch.nn.Module:
    """Verify the checkpoint folder in ``store`` and rebuild its network from it."""
    with scratch_dir("load") as scratch:
        loaded = read_folder(store, scratch, where, manifest_sha256)
        listed = {f.path for f in loaded.manifest.files}
        if MLMODEL not in listed:
            raise CheckpointCorruptedError(
                f"{where}: {MLMODEL} is not listed in the manifest, so the model factory it "
                "names cannot be trusted.",
                path=MLMODEL,
            )
        code = sorted(p for p in listed if p.startswith(f"{CODE_DIR}/"))
        # Already verified by read_folder; fetched again for their local paths (small files).
        local = verify_files(store, loaded.manifest, scratch, where, [MLMODEL, *code])
        config = flavor_config(local[MLMODEL])
        code_dir = _importable_code(loaded, {p: local[p] for p in code}) if code else None
    return build_model(config, loaded, where, code_dir)


def _importable_code(loaded: LoadedFolder, files: Mapping[str, Path]) -> Path:
    """Copy a checkpoint's verified ``code/`` files where they outlive this load.

    The folder is named by the files' hashes: loading the same code twice reuses one
    ``sys.path`` entry, and what it holds is always what the manifest vouched for.
    """
    digests = {f.path: f.digest for f in loaded.manifest.files}
    key = hashlib.sha256("".join(f"{p}:{digests[p]};" for p in sorted(files)).encode())
    root = Path(tempfile.gettempdir()) / f"mlflow-ckpt-code-{key.hexdigest()[:16]}"
    for rel, source in files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return root / CODE_DIR

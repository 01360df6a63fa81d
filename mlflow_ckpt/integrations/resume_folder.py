"""The temporary folder :func:`mlflow_ckpt.resume_path` writes into, and who removes it.

Without ``dst=``, ``resume_path`` writes a whole framework checkpoint (a Lightning ``.ckpt``
file, a Trainer ``checkpoint-N`` folder: the model *and* its optimizer) into a new temporary
folder. The framework reads it only after ``resume_path`` has returned, so ``resume_path``
cannot remove it, and left alone one such copy per resume piles up in ``/tmp``. The
integration callbacks remove it once their framework has read everything in it:

- Lightning: at ``on_train_start``, after its checkpoint connector has restored the whole
  checkpoint (a barrier first under several ranks, in case they share one folder);
- the Hugging Face Trainer: after the first optimizer step, because it reads the random
  streams' file inside its epoch loop, and at ``on_train_end`` if no step ran.

A marker file inside the folder names the folder itself, so a callback removes only a folder
that ``resume_path`` made for this (never a ``dst`` the user chose, nor a path that some
checkpoint's contents name, nor a copy of such a folder).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

PREFIX = "mlflow-ckpt-resume-path-"
MARKER = ".mlflow-ckpt-resume.json"


def make_temporary(run_id: str) -> Path:
    """A new temporary folder for ``run_id``'s framework checkpoint, marked as removable."""
    root = Path(tempfile.mkdtemp(prefix=PREFIX)).resolve()
    (root / MARKER).write_text(json.dumps({"folder": str(root), "run_id": run_id}))
    return root


def temporary_root(candidate: str | Path | None) -> Path | None:
    """``candidate`` if it is a folder :func:`make_temporary` made, else ``None``."""
    if not candidate:
        return None
    try:
        root = Path(candidate).resolve()
        marker = json.loads((root / MARKER).read_text())
    except (OSError, ValueError, RuntimeError):  # no marker, not JSON, a symlink loop
        return None
    if not isinstance(marker, dict) or marker.get("folder") != str(root):
        return None
    return root


def remove_temporary(root: Path) -> None:
    """Remove a folder :func:`temporary_root` accepted (already gone: nothing to do)."""
    shutil.rmtree(root, ignore_errors=True)
    if root.exists():
        logger.warning("Could not remove %s, the temporary copy of a resumed checkpoint", root)
    else:
        logger.info("Removed %s, the temporary copy of the checkpoint training resumed from", root)

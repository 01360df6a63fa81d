"""Local staging folders for uploads, and the sweep that removes those of dead processes.

A save to a remote store we cannot write from memory (an artifact repository other than
S3, Azure, GCS or an ``mlflow server``) stages each file in a temporary folder before its
upload. A process killed
mid-save leaves its folders behind in the system temp directory; their names carry the
owner's PID so that a later cleanup (``mlflow-ckpt gc``, or the next resume) can tell
abandoned folders from those of a save in progress.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

PREFIX = "mlflow-ckpt-upload-"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (owned by anyone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def new_staging_dir() -> Path:
    """A fresh staging folder named after this process."""
    return Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))


def sweep_stale_staging(root: Path | None = None) -> list[Path]:
    """Remove staging folders whose process is gone; return what was removed."""
    removed = []
    for folder in Path(root or tempfile.gettempdir()).glob(f"{PREFIX}*"):
        pid_text = folder.name[len(PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid() or pid_alive(int(pid_text)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        logger.info("Removed the staging folder %s of dead process %s", folder, pid_text)
        removed.append(folder)
    return removed

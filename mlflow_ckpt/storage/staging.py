"""Local staging and scratch folders, and the sweep that removes those of dead processes.

A save to a remote store we cannot write from memory (an artifact repository other than
S3, Azure, GCS or an ``mlflow server``) stages each file in a temporary folder before its
upload; a load, a verification or an archive fetches files into a scratch folder. A process
killed mid-way leaves such a folder behind in the system temp directory (a whole checkpoint,
for a load from S3), so their names carry the owner's PID: a later cleanup (``mlflow-ckpt
gc``, or the next resume) can tell abandoned folders from those of work in progress.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

PREFIX = "mlflow-ckpt-upload-"
SCRATCH_PREFIX = "mlflow-ckpt-scratch-"


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


@contextlib.contextmanager
def scratch_dir(purpose: str) -> Iterator[Path]:
    """A scratch folder named after this process and ``purpose``, removed on exit (what a
    ``TemporaryDirectory`` is, except that the sweep removes it if the process is killed)."""
    folder = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-{purpose}-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def sweep_stale_staging(root: Path | None = None) -> list[Path]:
    """Remove staging and scratch folders whose process is gone; return what was removed."""
    removed = []
    for prefix in (PREFIX, SCRATCH_PREFIX):
        for folder in Path(root or tempfile.gettempdir()).glob(f"{prefix}*"):
            pid_text = folder.name[len(prefix) :].split("-", 1)[0]
            mine = pid_text.isdigit() and int(pid_text) == os.getpid()
            if not pid_text.isdigit() or mine or pid_alive(int(pid_text)):
                continue
            shutil.rmtree(folder, ignore_errors=True)
            logger.info("Removed the folder %s of dead process %s", folder, pid_text)
            removed.append(folder)
    return removed

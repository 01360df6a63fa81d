"""Local staging and scratch folders, and the sweep that removes those of dead processes.

A save to a remote store we cannot write from memory (an artifact repository other than
S3, Azure, GCS or an ``mlflow server``) stages each file in a temporary folder before its
upload; a load, a verification or an archive fetches files into a scratch folder. A process
killed mid-way leaves such a folder behind in the system temp directory (a whole checkpoint,
for a load from S3), so their names carry the owner: its PID and the tag of its host and PID
namespace (``<prefix><pid>-<host tag>-...``). A later cleanup (``mlflow-ckpt gc``, or the
next resume) removes the folders of dead processes of its own namespace only: a temp
directory shared by containers that number their processes separately holds folders whose
PIDs cannot be checked from here, and those are left to their own namespace's cleanup.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mlflow_ckpt.storage.processes import host_tag, pid_alive

logger = logging.getLogger(__name__)

PREFIX = "mlflow-ckpt-upload-"
SCRATCH_PREFIX = "mlflow-ckpt-scratch-"


def owner_prefix(prefix: str, pid: int | None = None) -> str:
    """The start of the name of a folder owned by ``pid`` (this process by default)."""
    return f"{prefix}{os.getpid() if pid is None else pid}-{host_tag()}-"


def new_staging_dir() -> Path:
    """A fresh staging folder named after this process."""
    return Path(tempfile.mkdtemp(prefix=owner_prefix(PREFIX)))


@contextlib.contextmanager
def scratch_dir(purpose: str) -> Iterator[Path]:
    """A scratch folder named after this process and ``purpose``, removed on exit (what a
    ``TemporaryDirectory`` is, except that the sweep removes it if the process is killed)."""
    folder = Path(tempfile.mkdtemp(prefix=f"{owner_prefix(SCRATCH_PREFIX)}{purpose}-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def sweep_stale_staging(root: Path | None = None) -> list[Path]:
    """Remove the staging and scratch folders of dead processes of this host and PID
    namespace; return what was removed."""
    removed = []
    for prefix in (PREFIX, SCRATCH_PREFIX):
        for folder in Path(root or tempfile.gettempdir()).glob(f"{prefix}*"):
            pid_text, tag, *_ = [*folder.name[len(prefix) :].split("-"), "", ""]
            if not pid_text.isdigit() or tag != host_tag():
                continue  # not named by this version, or another namespace's: not ours to judge
            pid = int(pid_text)
            if pid == os.getpid() or pid_alive(pid):
                continue
            shutil.rmtree(folder, ignore_errors=True)
            logger.info("Removed the folder %s of dead process %s", folder, pid)
            removed.append(folder)
    return removed

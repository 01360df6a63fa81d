"""Local staging and scratch folders, and the sweep that removes those of dead processes.

A save to a remote store we cannot write from memory (an artifact repository other than
S3, Azure, GCS or an ``mlflow server``) stages each file in a temporary folder before its
upload; a load, a verification or an archive fetches files into a scratch folder. A process
killed mid-way leaves such a folder behind in the system temp directory (a whole checkpoint,
for a load from S3), and a later cleanup (``mlflow-ckpt gc``, or the next resume) removes it.

Which folders are abandoned is decided by a lock, not by a PID: the owner holds an exclusive
``flock`` on its folder for as long as the folder exists, and the kernel drops it when the
owner dies, however it dies. A PID would mislead where a temp directory outlives or spans
PID namespaces: containers of one pod sharing an ``emptyDir`` number their processes
separately (a live sibling's PID looks dead here), and a container restarted after an OOM
kill starts a new namespace (its dead predecessor's PIDs mean nothing). The lock means the
same to every process on the machine. The names still carry the owner's PID
(``<prefix><pid>-...``), for people reading the temp directory. A folder its owner could not
lock (a file system without locks, no descriptor left) is named ``mlflow-ckpt-unlocked-*``
and never swept: left behind by a kill, it costs space; swept, it could be taken mid-use.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: nothing is locked, nothing is swept
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

PREFIX = "mlflow-ckpt-upload-"
SCRATCH_PREFIX = "mlflow-ckpt-scratch-"
PREFIXES = (PREFIX, SCRATCH_PREFIX)  # what the sweep looks at
UNSWEPT_PREFIX = "mlflow-ckpt-unlocked-"  # a folder its owner could not lock: never swept
# A folder under its hidden name younger than this may be about to be locked: left alone.
SETTLE_S = 10.0


class OwnedFolder:
    """A fresh temporary folder, locked by this process until :meth:`remove`."""

    def __init__(self, prefix: str, purpose: str = "") -> None:
        name = f"{prefix}{os.getpid()}-" + (f"{purpose}-" if purpose else "")
        # Made under a hidden name, locked, then renamed: under its own name the folder is
        # never unlocked while its owner lives, so the sweep needs no grace period for it.
        pending = Path(tempfile.mkdtemp(prefix=f".{name}"))
        self._fd = _try_lock(pending)
        # Unlocked (no locks on this file system, or no descriptor left), a folder must not
        # be named for the sweep: another process could lock it and take it from us.
        visible = pending.name[1:] if self._fd is not None else UNSWEPT_PREFIX + pending.name
        self.path: Path = pending.with_name(visible)
        try:
            pending.rename(self.path)
        except OSError:
            self.path = pending
            self.remove()
            raise

    def remove(self) -> None:
        """Delete the folder, then let go of its lock (in that order: never unlocked and
        still there while this process lives)."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _try_lock(folder: Path) -> int | None:
    """An open descriptor of ``folder`` holding its exclusive lock, or ``None`` if someone
    holds it already or the file system cannot lock (then nobody can tell, and nobody
    sweeps)."""
    if fcntl is None:  # pragma: no cover
        return None
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held (BlockingIOError), or no locks on this file system
        os.close(fd)
        return None
    return fd


def new_staging_dir() -> OwnedFolder:
    """A fresh upload staging folder, owned by this process."""
    return OwnedFolder(PREFIX)


@contextlib.contextmanager
def scratch_dir(purpose: str) -> Iterator[Path]:
    """A scratch folder for ``purpose``, removed on exit (what a ``TemporaryDirectory`` is,
    except that the sweep removes it if the process is killed)."""
    folder = OwnedFolder(SCRATCH_PREFIX, purpose)
    try:
        yield folder.path
    finally:
        folder.remove()


def sweep_stale_staging(root: Path | None = None) -> list[Path]:
    """Remove the staging and scratch folders no live process holds; return them.

    A folder still under its hidden name may be between being made and being locked, so
    those are taken only once older than ``SETTLE_S`` (a process killed in that instant
    leaves one, empty)."""
    removed = []
    settled = time.time() - SETTLE_S
    folder_root = Path(root or tempfile.gettempdir())
    for prefix, hidden in [(p, False) for p in PREFIXES] + [(f".{p}", True) for p in PREFIXES]:
        for folder in folder_root.glob(f"{prefix}*"):
            try:
                info = folder.lstat()
            except OSError:  # removed meanwhile
                continue
            if not stat.S_ISDIR(info.st_mode) or (hidden and info.st_mtime > settled):
                continue  # a link or a file; or a folder perhaps not locked yet
            fd = _try_lock(folder)
            if fd is None:  # its owner lives (or nobody can tell)
                continue
            try:
                shutil.rmtree(folder, ignore_errors=True)
            finally:
                os.close(fd)
            logger.info("Removed %s, left by a process that no longer exists", folder)
            removed.append(folder)
    return removed

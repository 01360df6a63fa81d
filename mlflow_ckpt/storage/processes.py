"""Which process owns something, and whether that process still runs.

A leased run and a local scratch folder both name the process that made them, so that a
later process can tell abandoned ones from work in progress. A PID alone says little: the
containers of one node (one Kubernetes pod, say) can share a host name, a boot and a temp
directory while numbering their processes separately, and a PID is reused once its process
is gone. So an owner is a PID *within a host identity*, and only an owner of this process's
own identity can be checked for liveness here.
"""

from __future__ import annotations

import hashlib
import os
import socket
from functools import cache
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists in this PID namespace (owned by anyone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@cache
def host_identity() -> str:
    """Where PIDs mean something: host name, boot ID and PID namespace.

    Containers on one node can share the host name and boot ID but number their processes
    separately; only within one PID namespace can a PID be checked for liveness.
    """
    parts = [socket.gethostname()]
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8])
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        pass
    return "/".join(parts)


@cache
def host_tag() -> str:
    """:func:`host_identity` as 8 hex digits, short enough for a file name."""
    return hashlib.sha256(host_identity().encode()).hexdigest()[:8]


def process_started(pid: int) -> str:
    """When process ``pid`` started (clock ticks since boot), "" where unknown.

    With the PID it names one process for the life of the machine: a restarted container
    whose new process got the old PID is told apart from its dead predecessor.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22; the name may hold spaces

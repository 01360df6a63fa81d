"""The writer lease: at most one process writes a run's checkpoints at a time.

A preempted job that is restarted twice (or a restart racing a job that was only presumed
dead) would otherwise have two processes appending checkpoints from diverging trainings to
the same run. The lease is a run tag (:data:`~mlflow_ckpt.catalog.tags.RUN_WRITER`) holding
the owner's identity and a heartbeat that a daemon thread refreshes. Another writer is
refused while the lease is live; it may take over when the lease expired, when its owner is a
process on the same host that no longer exists (the usual ``kill -9`` and restart), or when
the user says ``force=True``. The owner checks the tag before each commit, so a process that
was taken over stops committing instead of interleaving. The lease is kept as an experiment
tag (``mlflow_ckpt.writer.<run id>``, what is read) and mirrored on the run's own tag (what
the UI shows): reading a run costs more the more checkpoints it has, an experiment does not.

MLflow has no compare-and-set on tags, so this is advisory: two processes that start in the
very same instant can both believe they own a fresh run until the next heartbeat tells the
loser. After a forced takeover the new owner waits out one commit window before it reads the
run, so a save the old owner was committing is either complete (and adopted) or rejected.

:func:`take_run` is how a process becomes a run's writer: the lease first, then cleaning up
after the last writer (:mod:`~mlflow_ckpt.catalog.recovery`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from mlflow_ckpt.catalog import tags
from mlflow_ckpt.catalog.recovery import recover_run, sweep_failed
from mlflow_ckpt.errors import WriterConflictError
from mlflow_ckpt.snapshot import preserved_python_rng

logger = logging.getLogger(__name__)

DEFAULT_TTL_S = 60.0
SETTLE_S = 1.0


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists in this PID namespace (owned by anyone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@cache
def _host() -> str:
    """Where PIDs mean something: host name, boot ID and PID namespace.

    Containers on one node can share the host name and boot ID but number their processes
    separately; only within one PID namespace can a lease's PID be checked for liveness.
    """
    parts = [socket.gethostname()]
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8])
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        pass
    return "/".join(parts)


def _started(pid: int) -> str:
    """When process ``pid`` started (clock ticks since boot), "" where unknown.

    With the PID it names one process for the life of the machine: a restarted container
    whose new process got the old PID is told apart from its dead predecessor.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22; the name may hold spaces


@dataclass(frozen=True)
class LeaseInfo:
    """What the run's lease tag says."""

    owner: str
    host: str
    pid: int
    heartbeat: float
    ttl: float
    started: str = ""

    @classmethod
    def parse(cls, text: str | None) -> LeaseInfo | None:
        if not text:
            return None
        try:
            data: Any = json.loads(text)
            return cls(
                owner=str(data["owner"]),
                host=str(data["host"]),
                pid=int(data["pid"]),
                heartbeat=float(data["heartbeat"]),
                ttl=float(data["ttl"]),
                started=str(data.get("started", "")),
            )
        except (ValueError, KeyError, TypeError):
            logger.warning("Ignoring an unreadable writer lease tag: %r", text[:200])
            return None

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    def is_this_process(self) -> bool:
        pid = os.getpid()
        return self.host == _host() and self.pid == pid and self.started == _started(pid)

    def why_stale(self, now: float) -> str | None:
        """Why this lease no longer protects anything, or ``None`` while its owner may live."""
        age = now - self.heartbeat
        if age > self.ttl:
            return f"its last heartbeat was {age:.0f}s ago (expiry {self.ttl:.0f}s)"
        local = self.host == _host() and not self.is_this_process()
        reused = bool(self.started) and _started(self.pid) != self.started  # PID given again
        if local and (not _pid_alive(self.pid) or reused):
            return f"process {self.pid} on this host no longer exists"
        return None

    def describe(self, now: float) -> str:
        return (
            f"process {self.pid} on {self.host.split('/')[0]} "
            f"(heartbeat {max(0.0, now - self.heartbeat):.0f}s ago, expires after {self.ttl:.0f}s)"
        )


def _experiment_key(run_id: str) -> str:
    return f"{tags.RUN_WRITER}.{run_id}"


def read_lease(client: MlflowClient, run_id: str, experiment_id: str) -> LeaseInfo | None:
    """The run's current lease, if any.

    Read from an experiment tag, not the run's own tag: ``get_run`` loads every LoggedModel
    output of the run (over HTTP it ships them all), so a read that happens at every save
    would cost more the more checkpoints the run has. ``get_experiment`` costs the same
    at the first checkpoint and the ten-thousandth.
    """
    experiment = client.get_experiment(experiment_id)
    return LeaseInfo.parse(experiment.tags.get(_experiment_key(run_id)))


def write_lease(client: MlflowClient, run_id: str, experiment_id: str, info: LeaseInfo) -> None:
    """Record ``info`` as the run's lease: the experiment tag that is read, and the run tag
    (``mlflow_ckpt.writer``) that shows the writer on the run in the UI."""
    text = info.to_json()
    client.set_experiment_tag(experiment_id, _experiment_key(run_id), text)
    client.set_tag(run_id, tags.RUN_WRITER, text)


def clear_lease(client: MlflowClient, run_id: str, experiment_id: str) -> None:
    """Drop the run's lease: the experiment tag that is read and the run tag the UI shows.

    ``MlflowClient.delete_experiment_tag`` came with MLflow 3.2; before it the experiment
    tag is emptied instead, which :meth:`LeaseInfo.parse` reads as no lease (one empty tag
    per run stays on the experiment)."""
    delete = getattr(client, "delete_experiment_tag", None)
    if delete is not None:
        delete(experiment_id, _experiment_key(run_id))
    else:
        client.set_experiment_tag(experiment_id, _experiment_key(run_id), "")
    client.delete_tag(run_id, tags.RUN_WRITER)


def _wait_for_expiry(
    client: MlflowClient, run_id: str, experiment_id: str, held: LeaseInfo
) -> LeaseInfo | None:
    """Watch ``held`` (a lease of another host) until it expires or is released; raise
    :class:`WriterConflictError` as soon as its heartbeat advances (its writer lives).

    Returns the lease as last read (stale by then), or ``None`` once it was released. A live
    writer heartbeats every ``ttl/4``, so it is told apart within about that, never later
    than the expiry itself.
    """
    remaining = held.heartbeat + held.ttl - time.time()
    logger.warning(
        "Run %s is held by %s, which cannot be checked from this host; waiting up to %.0fs "
        "for its lease to expire (a restarted job whose previous writer died on another "
        "node). A writer whose heartbeat still advances is refused.",
        run_id,
        held.describe(time.time()),
        max(0.0, remaining),
    )
    poll = min(max(held.ttl / 8, 0.1), 5.0)
    while True:
        time.sleep(poll)
        latest = read_lease(client, run_id, experiment_id)
        now = time.time()
        if latest is None:
            return None
        stale = latest.why_stale(now)
        if stale is not None:
            logger.info("The lease of run %s expired after waiting: %s", run_id, stale)
            return latest
        if latest.owner != held.owner or latest.heartbeat > held.heartbeat:
            raise WriterConflictError(
                f"Run {run_id} is being written by {latest.describe(now)}, which is alive: its "
                "heartbeat advanced while this process waited for it to expire. Two writers "
                "would interleave checkpoints from different trainings. Stop the other job "
                "(or give this one another key: run_name= / MLFLOW_CKPT_RUN_KEY), or pass "
                "force=True if you know it is gone."
            )


class WriterLease:
    """This process's claim on a run; keeps itself alive until :meth:`release`."""

    def __init__(
        self, client: MlflowClient, run_id: str, experiment_id: str, ttl: float = DEFAULT_TTL_S
    ) -> None:
        if ttl <= 0:
            raise ValueError(f"lease_ttl must be positive, got {ttl}")
        self.client = client
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.ttl = float(ttl)
        self.owner = uuid.uuid4().hex  # os.urandom: never touches the user's random streams
        self.lost_to: LeaseInfo | None = None
        # True when this process already held the run (an earlier manager in it): its saves
        # may still be in flight, so the new manager must not "recover" them.
        self.inherited = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def acquire(
        cls,
        client: MlflowClient,
        run_id: str,
        experiment_id: str,
        *,
        force: bool = False,
        ttl: float = DEFAULT_TTL_S,
        wait: bool = False,
    ) -> WriterLease:
        """Claim ``run_id`` for this process, or raise :class:`WriterConflictError`.

        ``wait``: a lease held by a process on another host (whose PID cannot be checked
        from here) is watched until it expires, and refused only if its heartbeat advances:
        a job restarted on another node must not be refused for the ``lease_ttl`` its dead
        predecessor's lease still has to run.
        """
        lease = cls(client, run_id, experiment_id, ttl)
        current = read_lease(client, run_id, experiment_id) or LeaseInfo.parse(
            client.get_run(run_id).data.tags.get(tags.RUN_WRITER)  # written by older versions
        )
        now = time.time()
        same_process = current is not None and current.is_this_process()
        stale = current.why_stale(now) if current is not None else None
        # A live-looking writer on another host: its PID cannot be checked from here, so
        # with `wait` its heartbeat is watched (a dead one's lease expires, a live one beats).
        unverifiable = current is not None and current.host != _host() and stale is None
        if wait and unverifiable and not force and not same_process:
            assert current is not None
            current = _wait_for_expiry(client, run_id, experiment_id, current)
            now = time.time()
            stale = current.why_stale(now) if current is not None else None
        if current is not None and not same_process and stale is None:
            if not force:
                raise WriterConflictError(
                    f"Run {run_id} is being written by {current.describe(now)}. Two writers "
                    "would interleave checkpoints from different trainings. Stop the other "
                    "job, wait for its lease to expire, or pass force=True (CLI: --force) if "
                    "you know it is gone."
                )
            logger.warning("Taking over run %s from %s (force=True)", run_id, current.describe(now))
        elif stale is not None:
            logger.info("Taking over run %s: the previous writer's %s", run_id, stale)
        lease.inherited = same_process
        lease._write_first()
        if current is not None and force and stale is None and not same_process:
            # Let a commit the old owner had already checked its lease for finish (or fail),
            # then make sure no one overwrote us meanwhile.
            time.sleep(SETTLE_S)
            lease.check()
        lease._thread = threading.Thread(
            target=lease._beat, name=f"mlflow-ckpt-lease-{run_id[:8]}", daemon=True
        )
        lease._thread.start()
        return lease

    def _info(self) -> LeaseInfo:
        pid = os.getpid()
        return LeaseInfo(self.owner, _host(), pid, time.time(), self.ttl, _started(pid))

    def _write(self) -> None:
        write_lease(self.client, self.run_id, self.experiment_id, self._info())

    def _write_first(self) -> None:
        """Write the new lease; if that fails because another process wrote it in the same
        instant (SQL stores insert a new tag key non-atomically, so the slower of two first
        writes fails), that process holds the run: refused like any second writer."""
        try:
            self._write()
        except MlflowException as exc:
            current = read_lease(self.client, self.run_id, self.experiment_id)
            now = time.time()
            if current is None or current.owner == self.owner or current.why_stale(now):
                raise
            raise WriterConflictError(
                f"Run {self.run_id} was taken by {current.describe(now)} in the same instant "
                "as this process (two starts of one job, e.g. a retried submission); it "
                "writes the run, this process stops. Stop the other job first if this one "
                "should continue it."
            ) from exc

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                current = read_lease(self.client, self.run_id, self.experiment_id)
                if current is not None and current.owner != self.owner:
                    self.lost_to = current
                    logger.error(
                        "Run %s was taken over by %s; this process no longer commits "
                        "checkpoints for it",
                        self.run_id,
                        current.describe(time.time()),
                    )
                    return
                self._write()
            except Exception:  # a missed heartbeat is retried; expiry is ttl, not ttl/4
                logger.warning("Writer lease heartbeat for run %s failed", self.run_id)

    def check(self) -> None:
        """Raise :class:`WriterConflictError` if another process holds the lease now."""
        current = self.lost_to or read_lease(self.client, self.run_id, self.experiment_id)
        if current is not None and current.owner != self.owner:
            self.lost_to = current
            raise WriterConflictError(
                f"Run {self.run_id} was taken over by {current.describe(time.time())}; this "
                "process no longer writes its checkpoints. Stop this job (the other one "
                "continues the run) or resume again with force=True."
            )

    def release(self) -> None:
        """Stop the heartbeat and drop the tag if it is still ours."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        try:
            current = read_lease(self.client, self.run_id, self.experiment_id)
            if current is not None and current.owner == self.owner:
                clear_lease(self.client, self.run_id, self.experiment_id)
        except Exception:
            logger.warning("Could not release the writer lease of run %s", self.run_id)


@dataclass
class RunClaim:
    """This process's hold on a run, and what taking it cleaned up."""

    lease: WriterLease
    adopted: list[str] = field(default_factory=list)  # complete saves a killed writer left
    swept: list[str] = field(default_factory=list)  # failed saves whose leftovers were removed

    def release(self) -> None:
        """Give the run back (drop the lease tag if it is still ours)."""
        self.lease.release()


def take_run(
    client: MlflowClient,
    run: Run,
    *,
    force: bool = False,
    ttl: float = DEFAULT_TTL_S,
    sweep: bool = False,
    wait: bool = False,
) -> RunClaim:
    """Acquire ``run``'s writer lease, then recover it; ``sweep`` also removes failed saves.

    ``CheckpointManager(...)``, ``CheckpointManager.resume(...)`` and ``mlflow-ckpt gc`` all
    start here. Only the lease holder may recover a run: a live writer's in-flight save
    looks exactly like a killed one, so recovery without the lease could adopt or delete it.
    A lease this process already held (an earlier manager in it) may have saves in flight:
    no recovery then.
    ``wait``: wait out the lease of a writer on another host that stopped heartbeating.

    Raises :class:`~mlflow_ckpt.errors.WriterConflictError` while another live process
    writes the run (unless ``force``). On any failure after the lease, it is released.
    """
    with preserved_python_rng():  # MLflow calls must not move the user's random streams
        lease = WriterLease.acquire(
            client, run.info.run_id, run.info.experiment_id, force=force, ttl=ttl, wait=wait
        )
        claim = RunClaim(lease)
        if lease.inherited:
            return claim
        try:
            claim.adopted = recover_run(client, run)
            if sweep:
                claim.swept = sweep_failed(client, run)
        except BaseException:
            lease.release()
            raise
    return claim

"""Taking a run over as its one writer: the lease first, then cleaning up after the last one.

``CheckpointManager(...)``, ``CheckpointManager.resume(...)`` and ``mlflow-ckpt gc`` all
start here. Only the lease holder may recover a run: a live writer's in-flight save looks
exactly like a killed one, so recovery without the lease could adopt or delete it. A lease
this process already held (an earlier manager in it) may have saves in flight: no recovery.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlflow import MlflowClient
from mlflow.entities import Run

from mlflow_ckpt.catalog.recovery import recover_run, sweep_failed
from mlflow_ckpt.manager.lease import DEFAULT_TTL_S, WriterLease
from mlflow_ckpt.snapshot import preserved_python_rng


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

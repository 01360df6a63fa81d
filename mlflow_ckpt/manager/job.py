"""The run of a job that was started without a run ID: ``resume="auto"``.

A scheduler restarts a preempted job with the same command line, so the job must find its
own run from something that command line already holds. That is the job's *key*, the first
of these that is set:

- ``run_name=`` given to the manager (or to ``autolog``/a callback);
- the environment variable ``MLFLOW_CKPT_RUN_KEY``;
- ``TORCHELASTIC_RUN_ID``: torchrun's ``--rdzv-id``, the same for every restart of one
  ``torchrun`` (``--standalone`` draws a new one per ``torchrun`` command; ``"none"``, the
  default without ``--rdzv-id``, names no job and is skipped);
- ``SLURM_JOB_ID`` (``_<SLURM_ARRAY_TASK_ID>`` appended in a job array), the same after an
  ``scontrol requeue``.

The key is stored on the run as the tag ``mlflow_ckpt.run_key`` and found again with one
search in the experiment MLflow would start the run in (``MLFLOW_EXPERIMENT_NAME``/``_ID``
or ``mlflow.set_experiment``). At most one run holds a key: two first starts that race
(a retried submission) both create a run, wait :data:`CREATE_SETTLE_S` for the other to
show, and agree on the older one; the other deletes its own run and adopts the winner (and
then meets the winner's writer lease like any second writer).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run

from mlflow_ckpt.catalog import tags
from mlflow_ckpt.errors import CheckpointError
from mlflow_ckpt.snapshot import preserved_python_rng

logger = logging.getLogger(__name__)

KEY_ENV = "MLFLOW_CKPT_RUN_KEY"
# A run name is a 250-character column in MLflow's SQL stores; the key is the run's name.
MAX_KEY_LENGTH = 250
# Letters, digits and what job IDs and run names use; never a quote or a backslash, which
# would have to be escaped inside the search filter, nor a control character.
_KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.:/@+=,()\[\]-]*")
# How long a new run waits before it looks for a racing first start of the same job. Much
# longer than a create request, so the two see each other's run and agree on one.
CREATE_SETTLE_S = 1.0


@dataclass(frozen=True)
class JobKey:
    """A job's identity: ``value`` is stored on its run; ``source`` says where it came from."""

    value: str
    source: str

    def describe(self) -> str:
        return f"job {self.value!r} (from {self.source})"


def check_key(value: str, source: str) -> str:
    """``value`` if it can name a run and be searched for, else a ``ValueError`` naming it."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"the job key from {source} is empty: {value!r}")
    value = value.strip()
    if len(value) > MAX_KEY_LENGTH:
        raise ValueError(
            f"the job key from {source} is {len(value)} characters long; MLflow run names "
            f"hold at most {MAX_KEY_LENGTH}: {value[:40]!r}..."
        )
    if not _KEY_PATTERN.fullmatch(value):
        raise ValueError(
            f"the job key {value!r} from {source} cannot name an MLflow run: use letters, "
            "digits and ' _.:/@+=,()[]-', starting with a letter or digit"
        )
    return value


def job_key(run_name: str | None, environ: Mapping[str, str] | None = None) -> JobKey:
    """The identity of this job (see the module docstring for the order), or a
    ``ValueError`` that says which to set."""
    env = os.environ if environ is None else environ
    if run_name is not None:
        return JobKey(check_key(run_name, "run_name="), "run_name=")
    if env.get(KEY_ENV):
        return JobKey(check_key(env[KEY_ENV], KEY_ENV), KEY_ENV)
    elastic = env.get("TORCHELASTIC_RUN_ID", "")
    if elastic and elastic != "none":
        value = check_key(f"torchelastic-{elastic}", "TORCHELASTIC_RUN_ID")
        return JobKey(value, "TORCHELASTIC_RUN_ID")
    if env.get("SLURM_JOB_ID"):
        task = env.get("SLURM_ARRAY_TASK_ID")
        job = env["SLURM_JOB_ID"] + (f"_{task}" if task else "")
        return JobKey(check_key(f"slurm-{job}", "SLURM_JOB_ID"), "SLURM_JOB_ID")
    raise ValueError(
        "resume='auto' finds this job's run again after a restart by a key the restarted "
        f"command still has, and none is set: pass run_name='...', set {KEY_ENV}, run under "
        "torchrun with --rdzv-id (TORCHELASTIC_RUN_ID) or under SLURM (SLURM_JOB_ID)"
    )


def _search(key: JobKey) -> list[Run]:
    """The live runs holding ``key``, in the experiment MLflow would start a run in."""
    with preserved_python_rng():
        runs = mlflow.search_runs(
            filter_string=f"tags.`{tags.RUN_KEY}` = '{key.value}'",
            output_format="list",
            max_results=10,
        )
    return list(runs)


def find_job_run(key: JobKey) -> Run | None:
    """The run of ``key``, ``None`` if there is none yet; several made by hand are an error.

    Two racing first starts may both show for up to :data:`CREATE_SETTLE_S` (until the loser
    has deleted its run), so a second look settles that before anything is refused.
    """
    runs = _search(key)
    if len(runs) > 1:
        time.sleep(2 * CREATE_SETTLE_S)
        runs = _search(key)
    if len(runs) > 1:
        listed = ", ".join(f"{r.info.run_id} ({r.info.run_name})" for r in runs)
        raise CheckpointError(
            f"Runs {listed} all hold the key of {key.describe()} (tag {tags.RUN_KEY}); "
            "resume='auto' cannot tell which one this job continues. Delete the runs that are "
            "not this job's (`mlflow runs delete --run-id ...`) or give this job another key."
        )
    return runs[0] if runs else None


def open_job_run(client: MlflowClient, key: JobKey) -> tuple[str, bool]:
    """The ID of job ``key``'s run, and whether it was started just now (as the active run,
    since there was none yet).

    A run already active in this process must be this job's (an earlier manager of the same
    job left it active); any other active run is an error, since the job's own run is the
    one its restarts will find.
    """
    active = mlflow.active_run()
    if active is not None:
        run_id = active.info.run_id
        if client.get_run(run_id).data.tags.get(tags.RUN_KEY) != key.value:
            raise CheckpointError(
                f"resume='auto' opens the run of {key.describe()} itself, but run {run_id} "
                f"({active.info.run_name}) is active in this process. Remove the "
                "mlflow.start_run() (the manager starts the job's run and leaves it active), "
                "end that run first, or drop resume='auto' to write into it."
            )
        return run_id, False
    found = find_job_run(key)
    if found is not None:
        logger.info("Continuing run %s of %s", found.info.run_id, key.describe())
        return found.info.run_id, False
    return _start(client, key)


def _start(client: MlflowClient, key: JobKey) -> tuple[str, bool]:
    """Start the job's run; if a racing first start made one too, keep the older of the two
    (this process's run then was not started: it is the other's)."""
    with preserved_python_rng():  # an explicit name: MLflow invents none from `random`
        created = mlflow.start_run(run_name=key.value, tags={tags.RUN_KEY: key.value})
    mine = created.info.run_id
    time.sleep(CREATE_SETTLE_S)
    runs = _search(key)
    winner = min(runs, key=lambda r: (r.info.start_time, r.info.run_id), default=None)
    if winner is None or winner.info.run_id == mine:
        logger.info("Started run %s for %s", mine, key.describe())
        return mine, True
    logger.warning(
        "Another first start of %s created run %s too; deleting this process's run %s and "
        "continuing %s",
        key.describe(),
        winner.info.run_id,
        mine,
        winner.info.run_id,
    )
    with preserved_python_rng():
        mlflow.end_run()
        client.delete_run(mine)
    return winner.info.run_id, False

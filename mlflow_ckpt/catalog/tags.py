"""Names of the tags mlflow_ckpt puts on LoggedModels and runs.

The tags are the catalog: listing, resuming and retention are MLflow queries over them, so
they work against whatever tracking server is configured, from any process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow.entities import LoggedModel

PREFIX = "mlflow_ckpt."
STEP = "mlflow_ckpt.step"
EPOCH = "mlflow_ckpt.epoch"
TRIGGER = "mlflow_ckpt.trigger"
STATUS = "mlflow_ckpt.status"
FORMAT = "mlflow_ckpt.format"
SIZE_BYTES = "mlflow_ckpt.size_bytes"  # logical: the state's bytes, uncompressed
STORED_BYTES = "mlflow_ckpt.stored_bytes"  # what its files take in the store
FORMAT_VERSION = "mlflow_ckpt.format_version"
MANIFEST_SHA256 = "mlflow_ckpt.manifest_sha256"
# While a promotion rewrites a checkpoint's manifest (self-contained): the new one's digest.
MANIFEST_SHA256_NEXT = "mlflow_ckpt.manifest_sha256_next"
# On an incremental checkpoint: the shared groups (model IDs, comma-separated) whose bytes in
# the run's shared area it references; what keeps those groups from being deleted.
SHARED = "mlflow_ckpt.shared"
RUN_RESUMES = "mlflow_ckpt.resumes"
RUN_RESUMED_FROM = "mlflow_ckpt.resumed_from"
# On a run: the first step whose state held NaN/inf and was therefore not committed.
RUN_NONFINITE_STEP = "mlflow_ckpt.nonfinite_step"
# The writer lease on a run: JSON naming the process that may write its checkpoints.
RUN_WRITER = "mlflow_ckpt.writer"
# On a checkpoint: the lease owner (writer ID) of the process that wrote it.
WRITER = "mlflow_ckpt.writer"
# On a run: the key of the job that owns it (resume="auto" finds the run again by it).
RUN_KEY = "mlflow_ckpt.run_key"

PENDING = "pending"
COMMITTED = "committed"
FAILED = "failed"
CORRUPT = "corrupt"
INVALID = "invalid"  # written, but failed verification after the save
INVALID_REASON = "mlflow_ckpt.invalid_reason"
# On a checkpoint saved with verify=<callable>: "pending" until the check passed. Recovery
# discards a pending save still marked so: its validation never finished.
VALIDATION = "mlflow_ckpt.validation"

MODEL_TYPE = "mlflow_ckpt.checkpoint"
# Every checkpoint's LoggedModel name: NAME_PREFIX + its step (queries.latest_checkpoint
# orders by it). Steps are non-negative integers.
NAME_PREFIX = "checkpoint-step-"


def model_name(step: int) -> str:
    """The LoggedModel name of the checkpoint of ``step``."""
    return f"{NAME_PREFIX}{step}"


# Checkpoints made after training from others (``mlflow_ckpt.average``) live in a source's
# run under a name of their own, tagged with their sources: run-scoped queries (listing,
# resume, retention, gc) leave them out (``is_average``, ``queries._training``), so such a
# checkpoint is never resumed from, deleted by the run's retention or averaged again, while
# a URI, an experiment-wide ``best_checkpoint`` and promotion see it like any other.
AVERAGE_NAME_PREFIX = "average-step-"
AVERAGE = "average"  # its trigger
# On an average: JSON list of its sources, [{"model_id", "step", "weight"}, ...].
AVERAGED_FROM = "mlflow_ckpt.averaged_from"


def average_name(step: int) -> str:
    """The LoggedModel name of an average whose newest source is at ``step``."""
    return f"{AVERAGE_NAME_PREFIX}{step}"


def is_average(model: LoggedModel) -> bool:
    """Whether ``model`` is an average (made after training), not a training checkpoint."""
    return (model.name or "").startswith(AVERAGE_NAME_PREFIX) and AVERAGED_FROM in model.tags


# On a checkpoint: why retention must never delete it (e.g. "pre_spike"); removed by unpin.
PINNED = "mlflow_ckpt.pinned"
PRE_SPIKE = "pre_spike"
# The trigger of the checkpoint saved when the process got its preemption signal.
PREEMPTED = "preempted"
# On a run: what the manager monitors, so tools (plot, best) know without being told.
RUN_MONITOR = "mlflow_ckpt.monitor"
RUN_MODE = "mlflow_ckpt.mode"
DELETING = "deleting"

# The cold tier: a checkpoint moved to the store's cold class (or recompressed) in place.
TIER = "mlflow_ckpt.tier"
HOT = "hot"
ARCHIVE = "archive"
STORAGE_CLASS = "mlflow_ckpt.storage_class"  # the class its files were moved to
# Archived by recompression (stores without classes): the compression it had before.
ARCHIVED_FROM = "mlflow_ckpt.archived_from"

# Set by MLflow on a LoggedModel that a registered model version points to.
MODEL_VERSIONS = "mlflow.modelVersions"


def manifest_digests(model_tags: dict[str, str]) -> tuple[str, ...]:
    """The manifest digests a checkpoint's tags accept (two while a promotion rewrites it)."""
    return tuple(
        d for d in (model_tags.get(MANIFEST_SHA256), model_tags.get(MANIFEST_SHA256_NEXT)) if d
    )


# On a run forked from a checkpoint (mlflow_ckpt.fork): where it branched off. A fork run
# without a checkpoint of its own resumes from FORKED_FROM (the source's checkpoint).
FORKED_FROM = "mlflow_ckpt.forked_from"  # the checkpoint's URI, models:/m-...
FORKED_FROM_RUN = "mlflow_ckpt.forked_from_run"
FORKED_FROM_STEP = "mlflow_ckpt.forked_from_step"
# "copying" while the source's history is copied in, "ready" after; a fork left "copying"
# (its process died) is never resumed, and the next fork of that checkpoint deletes it.
FORK_STATUS = "mlflow_ckpt.fork_status"
FORK_HEARTBEAT = "mlflow_ckpt.fork_heartbeat"  # time.time() at the last batch copied
COPYING = "copying"
READY = "ready"
# MLflow's own: the UI nests a run under the run this names.
PARENT_RUN = "mlflow.parentRunId"

"""Exception types raised by mlflow_ckpt.

Every error a user can hit derives from :class:`CheckpointError`, so ``except
mlflow_ckpt.CheckpointError`` catches all of them. Messages name the run, model or path
involved and say what to do about it, because a checkpoint failure is usually noticed hours
into a job by someone who needs to act quickly.
"""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every error raised by mlflow_ckpt."""


class CheckpointNotFoundError(CheckpointError, LookupError):
    """A run, model ID, URI or committed checkpoint that was asked for does not exist."""


class CheckpointCorruptedError(CheckpointError):
    """A checkpoint's files do not match its manifest (hash, size, missing file, bad header).

    ``path`` names the offending file so that operators can inspect or delete it.
    """

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class StateMismatchError(CheckpointError):
    """The objects given to restore into do not match what the checkpoint holds.

    The lists are kept as attributes so callers (and tests) can act on them without parsing
    the message.
    """

    def __init__(
        self,
        message: str,
        *,
        missing: list[str] | None = None,
        unexpected: list[str] | None = None,
        mismatched: list[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.missing: list[str] = missing or []
        self.unexpected: list[str] = unexpected or []
        self.mismatched: list[str] = mismatched or []


class StateSerializationError(CheckpointError, TypeError):
    """An object in the training state cannot be stored without pickling it."""


class CheckpointWriteError(CheckpointError):
    """A save failed; the previous checkpoint is untouched and the new one is invisible."""


class NoActiveRunError(CheckpointError):
    """No MLflow run to attach checkpoints to: none is active and no ``run_id`` was given."""


class WriterConflictError(CheckpointError):
    """Another live process holds the run's writer lease (or took it over from this one).

    Two writers on one run would interleave checkpoints from diverging trainings. Resume
    with ``force=True`` once the other process is known to be gone.
    """


class NonFiniteStateError(CheckpointError):
    """The state to save holds NaN or inf (``nonfinite="raise"``); nothing was committed."""


class CheckpointVerificationError(CheckpointWriteError):
    """A save was written but failed verification after it (``verify=``); tagged invalid."""


class MlflowVersionError(CheckpointError, ImportError):
    """The installed MLflow is older than mlflow_ckpt needs (raised when it is imported)."""


class EvaluationError(CheckpointError):
    """:func:`mlflow_ckpt.evaluate` could not score some checkpoints (raised after the others).

    ``failures`` maps each failed checkpoint's URI to its error; ``result`` is the whole
    :class:`~mlflow_ckpt.after_training.evaluation.EvaluationResult`, so what was evaluated is
    not lost with the exception. Calling ``evaluate`` again re-runs only the failed ones: the
    evaluated checkpoints are recorded and skipped.
    """

    def __init__(self, message: str, *, failures: dict[str, Exception], result: object) -> None:
        super().__init__(message)
        self.failures = failures
        self.result = result

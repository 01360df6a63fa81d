"""Score kept checkpoints after training: a new benchmark, logged as if measured at the time.

A held-out set or a metric that did not exist while the model trained is only useful if its
values land where the training metrics are: in the run's history at each checkpoint's step
and linked to the checkpoint's LoggedModel, so the Models tab shows it as a column and
:func:`mlflow_ckpt.best_checkpoint` ranks by it. :func:`evaluate` does that with one
``log_batch`` per checkpoint (:func:`mlflow_ckpt.catalog.metrics.log_step_metrics`).

Each LoggedModel also records which evaluations ran on it (a tag
``mlflow_ckpt.evaluated.<name>`` holding the metric keys), marked done only after the
metrics are logged: calling :func:`evaluate` again after a crash or a failure scores only
what is missing, and a run of 500 checkpoints is not re-scored because one failed.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModel
from mlflow.exceptions import MlflowException

from mlflow_ckpt.catalog import tags
from mlflow_ckpt.catalog.checkpoint import Checkpoint
from mlflow_ckpt.catalog.loading import load_model
from mlflow_ckpt.catalog.metrics import log_step_metrics
from mlflow_ckpt.catalog.queries import committed_models
from mlflow_ckpt.catalog.resolve import describe, resolve
from mlflow_ckpt.errors import CheckpointError, EvaluationError

logger = logging.getLogger(__name__)

# On a checkpoint's LoggedModel: EVALUATED + <evaluation name> = JSON list of the metric keys
# that evaluation logged at the checkpoint's step ({"pending": [...]} while it logs them).
EVALUATED = f"{tags.PREFIX}evaluated."

PENDING_KEY = "pending"  # the tag's value while the values are being logged

EVALUATED_STATUS = "evaluated"
SKIPPED = "skipped"
FAILED = "failed"

# Characters MLflow accepts in tag keys on every store (alphanumerics, _ - . /).
_NAME = re.compile(r"[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*")
_MAX_NAME = 200  # MLflow's tag keys stop at 250 characters, EVALUATED included
_MAX_TAG_VALUE = 8000  # MLflow's tag value limit
_RUN_ID = re.compile(r"[0-9a-f]{32}")

Metrics = Mapping[str, float]
EvalFn = Callable[[torch.nn.Module], Metrics]


@dataclass(frozen=True)
class CheckpointEvaluation:
    """What :func:`evaluate` did with one checkpoint.

    ``status`` is ``"evaluated"`` (``metrics`` were logged now), ``"skipped"`` (this
    evaluation had run before; ``metrics`` are the values it logged then) or ``"failed"``
    (``error`` says why; nothing was recorded, so the next call tries it again).
    ``checkpoint`` is ``None`` only when the reference itself did not resolve.
    """

    uri: str
    checkpoint: Checkpoint | None
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    error: Exception | None = None


@dataclass(frozen=True)
class EvaluationResult:
    """Every checkpoint :func:`evaluate` was given, in the order it went through them."""

    name: str  # the evaluation's identity: the tag mlflow_ckpt.evaluated.<name>
    checkpoints: tuple[CheckpointEvaluation, ...]

    @property
    def evaluated(self) -> list[CheckpointEvaluation]:
        return [c for c in self.checkpoints if c.status == EVALUATED_STATUS]

    @property
    def skipped(self) -> list[CheckpointEvaluation]:
        return [c for c in self.checkpoints if c.status == SKIPPED]

    @property
    def failed(self) -> list[CheckpointEvaluation]:
        return [c for c in self.checkpoints if c.status == FAILED]


@dataclass(frozen=True)
class _Job:
    fn: EvalFn
    name: str
    prefix: str
    overwrite: bool


def evaluate(
    run_id_or_checkpoints: str | Checkpoint | Sequence[Checkpoint | str],
    fn: EvalFn,
    *,
    metric_prefix: str = "",
    name: str | None = None,
    overwrite: bool = False,
    raise_on_failure: bool = True,
    progress: bool | None = None,
    client: MlflowClient | None = None,
) -> EvaluationResult:
    """Score checkpoints with ``fn`` and log its metrics at each checkpoint's step, linked to it.

    ``run_id_or_checkpoints``: a run ID (every committed checkpoint of the run, oldest step
    first), or checkpoints (``Checkpoint`` records or URIs such as ``models:/m-...`` and
    ``models:/name@alias``), taken in the order given.

    For each checkpoint the network is rebuilt with its ``model_factory`` in eval mode
    (:func:`mlflow_ckpt.load_model`: every hash checked), on the CPU, and
    ``fn(model) -> {name: number}`` is called under ``torch.no_grad()`` (use
    ``torch.enable_grad()`` inside ``fn`` if it needs gradients; move the model to a device
    there). Each value is logged as ``metric_prefix + name`` at the checkpoint's step to the
    checkpoint's run (finished runs included) and linked to its LoggedModel, so
    ``best_checkpoint(run_id=..., metric=metric_prefix + name)`` ranks by it. NaN and inf
    are logged to the run only, as during training: a model's NaN would be stored as 0.0.
    A name the checkpoint already has a value for (the training's ``val_loss``) is refused
    for that checkpoint: use ``metric_prefix``.

    An evaluation is known by ``name``: by default ``metric_prefix`` + ``fn``'s module and
    qualified name; a lambda, ``functools.partial``, bound method or callable object needs
    ``name=`` (what it closes over, a dataset or a threshold, is not in its name). Each
    checkpoint evaluated is tagged ``mlflow_ckpt.evaluated.<name>`` after its metrics are
    logged; a tagged checkpoint is skipped unless ``overwrite=True``, which logs new values
    that then win (a newer timestamp at the same step: what ``best_checkpoint`` and the
    Models tab read).

    A checkpoint that fails (``fn`` raises, its files do not verify, it has no model factory,
    the run is deleted) is logged as a warning naming it and the error, and the others go
    on. At the end, if any failed, :class:`~mlflow_ckpt.errors.EvaluationError` is raised
    (its ``result`` holds every outcome) unless ``raise_on_failure=False``, which returns
    the result with them in ``result.failed``. A progress bar goes to stderr when it is a
    terminal (``progress=True``/``False`` forces it on or off).
    """
    job = _Job(fn, evaluation_name(fn, metric_prefix, name), metric_prefix, overwrite)
    client = client or MlflowClient()
    targets = _targets(client, run_id_or_checkpoints)
    outcomes: list[CheckpointEvaluation] = []
    seen: set[str] = set()
    with _progress_bar(len(targets), job.name, progress) as bar:
        for ref, model in targets:
            outcomes.append(_evaluate_one(client, ref, model, job, seen))
            bar.update(1)
    result = EvaluationResult(job.name, tuple(outcomes))
    if result.failed:
        error = _aggregate_error(result)
        if raise_on_failure:
            raise error from result.failed[0].error
        logger.warning("%s", error)
    return result


def evaluation_name(
    fn: Callable[..., Any], metric_prefix: str = "", name: str | None = None
) -> str:
    """The identity of an evaluation: ``name``, else ``metric_prefix`` + ``fn``'s path.

    Only a plain ``def`` function is named by default: two lambdas of one module share the
    name ``<lambda>``, and two ``partial(score, data=a)``/``partial(score, data=b)`` share
    ``score``, so the second would be skipped as already done.
    """
    if name is not None:
        if not _NAME.fullmatch(name) or len(name) > _MAX_NAME:
            raise ValueError(
                f"evaluation name {name!r}: use letters, digits, '_', '-', '.' and single '/' "
                f"between parts, at most {_MAX_NAME} characters (it becomes the tag "
                f"{EVALUATED}<name> on each checkpoint)."
            )
        return name
    if not inspect.isfunction(fn) or fn.__name__ == "<lambda>":
        raise ValueError(
            f"evaluate() needs name= for {fn!r}: a lambda, partial, bound method or callable "
            "object may hold state (a dataset, a threshold) that its name does not show, so "
            "its name cannot tell this evaluation from another. Pass e.g. name='heldout_v2'."
        )
    raw = f"{metric_prefix}{fn.__module__}.{fn.__qualname__}"
    cleaned = "/".join(p for p in re.sub(r"[^A-Za-z0-9_.\-/]+", "_", raw).split("/") if p)
    if not cleaned or len(cleaned) > _MAX_NAME:
        raise ValueError(f"evaluate() cannot name {fn!r} from {raw!r}: pass name=")
    return cleaned


def _targets(
    client: MlflowClient, refs: str | Checkpoint | Sequence[Checkpoint | str]
) -> list[tuple[Checkpoint | str, LoggedModel | None]]:
    """What to evaluate: a run's committed checkpoints (with their LoggedModels, one listing),
    or the references given (resolved one by one, so a bad one fails alone)."""
    if isinstance(refs, str) and _RUN_ID.fullmatch(refs):
        models = committed_models(client, refs)
        if not models:
            logger.warning("Run %s has no committed checkpoints to evaluate.", refs)
        ordered = sorted(models, key=lambda m: (_step(m), m.creation_timestamp))
        return [(f"models:/{m.model_id}", m) for m in ordered]
    if isinstance(refs, (str, Checkpoint)):
        refs = [refs]
    unique = {_ref_key(r): r for r in refs}  # (dict keeps the first position)
    return [(r, None) for r in unique.values()]


def _ref_key(ref: Checkpoint | str) -> str:
    if isinstance(ref, Checkpoint):
        return ref.uri
    if isinstance(ref, str):
        return f"models:/{ref}" if ref.startswith("m-") else ref
    raise TypeError(f"expected a run ID, Checkpoints or URIs, got {type(ref).__name__}")


def _step(model: LoggedModel) -> int:
    return int(model.tags.get(tags.STEP, "0"))


def _evaluate_one(
    client: MlflowClient,
    ref: Checkpoint | str,
    model: LoggedModel | None,
    job: _Job,
    seen: set[str],
) -> CheckpointEvaluation:
    """Evaluate one checkpoint; any failure becomes its outcome (and a warning)."""
    uri = ref.uri if isinstance(ref, Checkpoint) else ref
    ckpt: Checkpoint | None = None
    try:
        model = model or resolve(ref, client)
        ckpt = Checkpoint.from_logged_model(model)
        uri = ckpt.uri
        done, own = recorded(model, job.name)
        if model.model_id in seen or (done and not job.overwrite):
            kept = {k: ckpt.metrics[k] for k in own if k in ckpt.metrics}
            return CheckpointEvaluation(uri, ckpt, SKIPPED, kept)
        seen.add(model.model_id)
        metrics = _score(client, model, job)
        _refuse_shadowing(ckpt, metrics, own, job.name)
        keys = sorted({*own, *metrics})
        _mark(client, model, job.name, {PENDING_KEY: keys})  # ours, but not done
        _log(client, model, ckpt.step, metrics)
        _mark(client, model, job.name, keys)  # done: only now, after the values
        return CheckpointEvaluation(uri, ckpt, EVALUATED_STATUS, metrics)
    except Exception as exc:
        where = f"{uri} (run {ckpt.run_id}, step {ckpt.step})" if ckpt else uri
        logger.warning("Evaluation %r of checkpoint %s failed: %s", job.name, where, exc)
        return CheckpointEvaluation(uri, ckpt, FAILED, error=exc)


def recorded(model: LoggedModel, name: str) -> tuple[bool, list[str]]:
    """Whether evaluation ``name`` finished on this checkpoint, and the metric keys it logged
    there (or was logging: a process that died between the values and the final tag left
    them marked pending, so the next call evaluates the checkpoint again and may replace
    them). A tag that does not parse still means it finished."""
    value = model.tags.get(EVALUATED + name)
    if value is None:
        return False, []
    try:
        parsed = json.loads(value)
    except ValueError:
        return True, []
    done = isinstance(parsed, list)
    keys = parsed if done else parsed.get(PENDING_KEY) if isinstance(parsed, dict) else []
    return done, [k for k in keys or [] if isinstance(k, str)]


def _score(client: MlflowClient, model: LoggedModel, job: _Job) -> dict[str, float]:
    """Rebuild the network (eval mode, hashes checked) and run ``fn`` on it without grad."""
    network = load_model(model.model_id, client=client)
    with torch.no_grad():
        raw = job.fn(network)
    return _prefixed(raw, job.prefix, describe(model))


def _prefixed(raw: object, prefix: str, where: str) -> dict[str, float]:
    """``fn``'s answer as ``{prefix + name: float}``, refused with the offending entry named."""
    if not isinstance(raw, Mapping):
        raise CheckpointError(
            f"The evaluation function returned {type(raw).__name__} for checkpoint {where}; "
            "it must return a mapping of metric names to numbers, e.g. {'accuracy': 0.93}."
        )
    metrics: dict[str, float] = {}
    for key, value in raw.items():
        try:
            metrics[f"{prefix}{key}"] = float(value)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(
                f"The evaluation function's metric {key!r} for checkpoint {where} is "
                f"{type(value).__name__} {value!r:.80}, not a number; return a float (or a "
                "one-element tensor: .item())."
            ) from exc
    return metrics


def _refuse_shadowing(ckpt: Checkpoint, metrics: Metrics, own: list[str], name: str) -> None:
    """Refuse to log over a value this evaluation did not log itself (the training's
    ``val_loss``, another evaluation's): the newer value would replace it for ranking, and
    ``keep_best_n`` retention and the ``best`` trigger's history rank by the training's."""
    taken = sorted(k for k in metrics if k in ckpt.metrics and k not in own)
    if taken:
        raise CheckpointError(
            f"Evaluation {name!r} would log {', '.join(taken)} at step {ckpt.step} of "
            f"checkpoint {ckpt.uri} (run {ckpt.run_id}), which already holds a value of its "
            "own for it (logged by the training or another evaluation) that the new one "
            "would replace. Pass a metric_prefix= (e.g. 'eval/') or rename the metric."
        )


def _log(client: MlflowClient, model: LoggedModel, step: int, metrics: Metrics) -> None:
    """One ``log_batch`` at the checkpoint's step, linked to it, newer than what it has."""
    run_id = model.source_run_id or ""
    _warn_stale(model, step, metrics)
    try:
        log_step_metrics(
            client,
            run_id,
            metrics,
            step=step,
            timestamp_ms=_timestamp(model, metrics),
            model_id=model.model_id,
        )
    except MlflowException as exc:
        raise CheckpointError(
            f"Could not log the evaluation metrics of checkpoint {describe(model)} to run "
            f"{run_id}: {exc.message}. MLflow refuses metrics for a deleted run (restore it: "
            f"`mlflow runs restore --run-id {run_id}`) and names that are not valid metric keys."
        ) from exc


def _timestamp(model: LoggedModel, metrics: Metrics) -> int:
    """Now, or later than every value of these metrics the checkpoint holds.

    The newest timestamp at a step is what ``Checkpoint.from_logged_model`` and MLflow's
    ordering by metric read, so an overwrite must be newer even within one millisecond; two
    values at one timestamp would also collide in MLflow's key for a model's metrics.
    """
    now = int(time.time() * 1000)
    held = [m.timestamp for m in model.metrics or [] if m.key in metrics]
    return max([now, *(t + 1 for t in held)])


def _warn_stale(model: LoggedModel, step: int, metrics: Metrics) -> None:
    """A non-finite value is logged to the run only; a finite one linked earlier stays the
    checkpoint's value (MLflow cannot unlink a model's metric): say so."""
    for key, value in metrics.items():
        if math.isfinite(value):
            continue
        old = [m.value for m in model.metrics or [] if m.key == key and m.step == step]
        if old:
            logger.warning(
                "Checkpoint %s: %s is now %s, logged to the run only; its LoggedModel keeps "
                "the earlier %s, which best_checkpoint and the Models tab still show.",
                describe(model),
                key,
                value,
                old[-1],
            )


def _mark(
    client: MlflowClient, model: LoggedModel, name: str, keys: list[str] | dict[str, list[str]]
) -> None:
    """Tag the checkpoint with evaluation ``name``'s keys: a JSON list once done, or
    ``{"pending": [...]}`` while its values are being logged."""
    client.set_logged_model_tags(model.model_id, {EVALUATED + name: _keys_json(keys)})


def _keys_json(keys: list[str] | dict[str, list[str]]) -> str:
    """The keys as JSON within MLflow's tag value limit (the first ones that fit)."""
    listed = keys if isinstance(keys, list) else keys[PENDING_KEY]
    fitting = len(listed)
    while len(text := _as_json(keys, listed[:fitting])) > _MAX_TAG_VALUE:
        fitting -= 1
    return text


def _as_json(keys: list[str] | dict[str, list[str]], listed: list[str]) -> str:
    return json.dumps(listed if isinstance(keys, list) else {PENDING_KEY: listed})


def _aggregate_error(result: EvaluationResult) -> EvaluationError:
    failed = result.failed
    lines = [
        f"  {c.uri}"
        + (f" (run {c.checkpoint.run_id}, step {c.checkpoint.step})" if c.checkpoint else "")
        + f": {type(c.error).__name__}: {c.error}"
        for c in failed
    ]
    message = (
        f"Evaluation {result.name!r} failed on {len(failed)} of {len(result.checkpoints)} "
        "checkpoint(s):\n" + "\n".join(lines) + "\nThe others were evaluated and recorded. "
        "Fix the cause and call evaluate() again: only the failed ones run again."
    )
    return EvaluationError(
        message, failures={c.uri: c.error for c in failed if c.error}, result=result
    )


def _progress_bar(total: int, label: str, progress: bool | None) -> Any:
    """One tick per checkpoint on stderr: on a terminal, or as ``progress`` forces it."""
    from tqdm import tqdm

    enabled = sys.stderr.isatty() if progress is None else progress
    return tqdm(
        total=total,
        desc=f"evaluate {label}",
        unit="ckpt",
        disable=not enabled,
        file=sys.stderr,
        leave=False,
    )

"""Which checkpoints exist, and which is newest or best: answered by MLflow queries.

Nothing here keeps a local list. Every answer comes from ``search_logged_models`` against the
configured tracking store, so any process (a resumed job, the CLI, a notebook) sees the same
catalog. Only committed checkpoints are ever returned.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.entities import LoggedModel

from mlflow_ckpt.catalog import tags
from mlflow_ckpt.catalog.checkpoint import Checkpoint
from mlflow_ckpt.catalog.runs import get_run

_PAGE = 1000
_BEST_PAGE = 100
_PAST_AVERAGES = 10  # latest_checkpoint looks past this many averages before listing


def search_models(
    client: MlflowClient, experiment_ids: list[str], filter_string: str
) -> list[LoggedModel]:
    """All LoggedModels matching ``filter_string``, across result pages."""
    found: list[LoggedModel] = []
    token: str | None = None
    while True:
        page = client.search_logged_models(
            experiment_ids, filter_string=filter_string, max_results=_PAGE, page_token=token
        )
        found.extend(page)
        token = page.token
        if not token:
            return found


def _committed_filter(extra: str | None = None) -> str:
    clause = f"tags.`{tags.STATUS}` = '{tags.COMMITTED}'"
    return f"{clause} AND {extra}" if extra else clause


def _training(models: Iterable[LoggedModel]) -> list[LoggedModel]:
    """``models`` without the averages among them (:func:`tags.is_average`).

    An average lives in a source's run but is no training checkpoint: it must never be
    resumed from, deleted by the run's retention or averaged again. MLflow's filters have no
    ``NOT LIKE`` (and a ``!=`` on a tag or on ``model_type`` also drops models that lack it,
    such as checkpoints imported under another name), so they are left out here, from the
    page the query returned anyway.
    """
    return [m for m in models if not tags.is_average(m)]


def _newest_first(models: Iterable[LoggedModel]) -> list[Checkpoint]:
    return [ckpt for ckpt, _ in newest_first_with_models(models)]


def newest_first_with_models(
    models: Iterable[LoggedModel],
) -> list[tuple[Checkpoint, LoggedModel]]:
    """Checkpoint records of ``models``, newest step first (ties: the newer), each with its
    LoggedModel (whose tags hold what a reader checks, with no request per checkpoint)."""
    pairs = [(Checkpoint.from_logged_model(m), m) for m in models]
    pairs.sort(key=lambda pair: (pair[0].step, pair[0].created_at), reverse=True)
    return pairs


def committed_models(
    client: MlflowClient,
    run_id: str,
    filter_string: str | None = None,
    *,
    experiment_id: str | None = None,
) -> list[LoggedModel]:
    """The LoggedModels of a run's committed checkpoints (optionally filtered further);
    averages logged in the run are not among them (see :func:`_training`).

    Pass ``experiment_id`` when it is known: finding it costs a ``get_run``, which loads
    every LoggedModel output of the run.
    """
    if experiment_id is None:
        experiment_id = get_run(client, run_id).info.experiment_id
    clause = f"source_run_id = '{run_id}'"
    if filter_string:
        clause = f"{clause} AND {filter_string}"
    return _training(search_models(client, [experiment_id], _committed_filter(clause)))


def list_checkpoints(run_id: str, *, client: MlflowClient | None = None) -> list[Checkpoint]:
    """The committed checkpoints of a run, newest step first.

    Training checkpoints only: an average logged in the run (``mlflow_ckpt.average``) is
    found by its URI or an experiment-wide :func:`best_checkpoint`, never resumed from.
    """
    return committed_checkpoints(client or MlflowClient(), run_id)


def latest_checkpoint(run_id: str, *, client: MlflowClient | None = None) -> Checkpoint | None:
    """The committed checkpoint of a run with the highest step, or ``None``.

    Without listing the run: MLflow orders LoggedModels by attributes, not by tags, and the
    step is a tag. But a checkpoint's name is ``checkpoint-step-<step>``, an attribute, and
    among names of one length name order is step order. So three requests for one model
    each, at any number of checkpoints (see :func:`_latest_by_name`); the run is listed in
    full only where that reasoning does not hold.
    """
    client = client or MlflowClient()
    return newest_committed(client, run_id, get_run(client, run_id).info.experiment_id)


def newest_committed(client: MlflowClient, run_id: str, experiment_id: str) -> Checkpoint | None:
    """:func:`latest_checkpoint` where the run's experiment is known (no ``get_run``: it
    loads every LoggedModel output of the run, 0.25 s at 10,000 checkpoints)."""
    try:
        return _latest_by_name(client, run_id, experiment_id)
    except _ListInstead:
        ckpts = committed_checkpoints(client, run_id, experiment_id)
        return ckpts[0] if ckpts else None


def committed_checkpoints(
    client: MlflowClient, run_id: str, experiment_id: str | None = None
) -> list[Checkpoint]:
    """:func:`list_checkpoints`, without a ``get_run`` where the run's experiment is known."""
    return _newest_first(committed_models(client, run_id, experiment_id=experiment_id))


class _ListInstead(Exception):
    """Names that do not tell the highest step: the run is listed instead."""


_NEWER_FIRST = {"field_name": "creation_timestamp", "ascending": False}


def _latest_by_name(client: MlflowClient, run_id: str, experiment_id: str) -> Checkpoint | None:
    """The newest checkpoint's step gives the name length to look at; one request makes sure
    that no longer name exists (if one does, steps went down at some point); one orders the
    names of that length (ties: the newer checkpoint)."""

    def first(clause: str, order: list[dict[str, object]]) -> LoggedModel | None:
        page = client.search_logged_models(
            [experiment_id],
            filter_string=_committed_filter(f"source_run_id = '{run_id}' AND {clause}"),
            order_by=order,
            max_results=1,
        )
        return page[0] if page else None

    def named(name_like: str, order: list[dict[str, object]]) -> Checkpoint | None:
        model = first(f"name LIKE '{tags.NAME_PREFIX}{name_like}'", order)
        return None if model is None else Checkpoint.from_logged_model(model)

    newest = _newest_not_average(first)
    if newest is None:
        return None
    if newest.name != tags.model_name(newest.step):  # (none should differ)
        raise _ListInstead
    digits = len(str(newest.step))
    if named("_" * (digits + 1) + "%", [_NEWER_FIRST]) is not None:
        raise _ListInstead
    return named("_" * digits, [{"field_name": "name", "ascending": False}, _NEWER_FIRST])


@dataclass(frozen=True)
class _Newest:
    name: str
    step: int


def _newest_not_average(
    first: Callable[[str, list[dict[str, object]]], LoggedModel | None],
) -> _Newest | None:
    """The run's newest committed model that is no average, one request at a time: an
    average made after training is often the newest model of its run. Past
    ``_PAST_AVERAGES`` averages in a row the run is listed instead."""
    clause = "creation_timestamp >= 0"
    for _ in range(_PAST_AVERAGES + 1):
        model = first(clause, [_NEWER_FIRST])
        if model is None:
            return None
        if not tags.is_average(model):
            return _Newest(model.name or "", Checkpoint.from_logged_model(model).step)
        clause += (
            f" AND creation_timestamp <= {model.creation_timestamp}"
            f" AND model_id != '{model.model_id}'"
        )
    raise _ListInstead


def best_checkpoint(
    *,
    run_id: str | None = None,
    experiment_ids: list[str] | None = None,
    metric: str,
    mode: str = "min",
    filter_string: str | None = None,
    run_filter: str | None = None,
    client: MlflowClient | None = None,
) -> Checkpoint | None:
    """The committed checkpoint with the best value of ``metric`` at its own step.

    ``mode`` is ``"min"`` or ``"max"``. NaN and infinite values never win; ties go to the
    newer step. Give a ``run_id`` or ``experiment_ids`` (and optionally an MLflow
    ``filter_string`` over LoggedModels, e.g. ``"tags.`mlflow_ckpt.trigger` LIKE '%best%'"``,
    and ``run_filter``, an MLflow run filter such as ``"params.lr = '0.01'"``).
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', not {mode!r}")
    if (run_id is None) == (experiment_ids is None):
        raise ValueError("give exactly one of run_id= or experiment_ids=")
    client = client or MlflowClient()
    if run_id is not None:
        experiments = [get_run(client, run_id).info.experiment_id]
        clause = f"source_run_id = '{run_id}'"
        filter_string = f"{clause} AND {filter_string}" if filter_string else clause
    else:
        experiments = list(experiment_ids or [])
    allowed = None
    if run_filter:
        runs = client.search_runs(experiments, filter_string=run_filter, max_results=50_000)
        allowed = {r.info.run_id for r in runs}
    return _best_by_ordered_search(
        client, experiments, _committed_filter(filter_string), metric, mode, allowed
    )


def _best_by_ordered_search(
    client: MlflowClient,
    experiment_ids: list[str],
    filter_string: str,
    metric: str,
    mode: str,
    allowed_runs: set[str] | None,
) -> Checkpoint | None:
    """The best checkpoint without listing them all: pages ordered by ``metric`` in the
    tracking store, read until the values are worse than the best finite one seen (a small
    first page, which usually settles it; full pages after it, when ties run long).

    The store orders by the stored value; for finite values that is the true order, so once
    a page ends on a finite value worse than the best, no later page can hold a better one
    or a tie (ties go to the newer step, so every tie is read). NaN and infinite values,
    wherever the store sorts them, never win; models without the metric come last.
    """
    order = [{"field_name": f"metrics.{metric}", "ascending": mode == "min"}]
    sign = 1.0 if mode == "min" else -1.0
    seen: list[Checkpoint] = []
    token: str | None = None
    while True:
        page = client.search_logged_models(
            experiment_ids,
            filter_string=filter_string,
            order_by=order,
            max_results=_BEST_PAGE if token is None else _PAGE,  # ties can run long
            page_token=token,
        )
        ckpts = [Checkpoint.from_logged_model(m) for m in page]
        seen.extend(c for c in ckpts if allowed_runs is None or c.run_id in allowed_runs)
        best = pick_best(seen, metric, mode)
        token = page.token
        if not token or not ckpts:
            return best
        last = ckpts[-1].metric(metric)
        if last is None:  # models without the metric come last: nothing better follows
            return best
        if best is not None and math.isfinite(last):
            value = best.metric(metric)
            assert value is not None
            if sign * last > sign * value:
                return best


def pick_best(candidates: Iterable[Checkpoint], metric: str, mode: str) -> Checkpoint | None:
    """The best of ``candidates`` by ``metric`` at its own step (NaN/inf never; ties: newer)."""
    scored = [(c.metric(metric), c) for c in candidates]
    valid = [(v, c) for v, c in scored if v is not None and math.isfinite(v)]
    if not valid:
        return None
    sign = 1.0 if mode == "min" else -1.0
    return min(valid, key=lambda vc: (sign * vc[0], -vc[1].step))[1]

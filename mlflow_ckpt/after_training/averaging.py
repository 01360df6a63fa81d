"""Checkpoint averaging: the (weighted) mean of several checkpoints' weights, logged as a
checkpoint of its own.

Averaging the weights of the last few checkpoints of a run (LAWA, fairseq's
``average_checkpoints.py``) or of several fine-tunings of one base model ("model soups")
often generalises better than any single one, at no training cost. The result is a normal
committed checkpoint (``MLmodel``, verified files, manifest, committed tag), so ``load``,
``load_model``, ``mlflow.pyfunc.load_model``, ``mlflow models predict`` and ``promote`` take it
as they take any other.

It is logged in the newest source's run under its own LoggedModel name
(``average-step-<step>``, :func:`~mlflow_ckpt.catalog.tags.average_name`), never a training
checkpoint's (``checkpoint-step-<step>``): the run-scoped queries (``list_checkpoints``,
resume, retention, ``gc``) select training names only, so an average is never resumed from
(it has no optimizer state), never deleted by the run's retention and never averaged again by
``--last N``. Its URI, an experiment-wide ``best_checkpoint`` and promotion see it.

No writer lease is taken and no manager is built: the run may be finished, or still owned by
its training job, and an average adds a LoggedModel beside that job's without touching any of
its checkpoints. Like a save it is created ``pending`` and tagged ``committed`` last, so a
kill at any moment leaves nothing listed or loadable; a failure removes what was written
(:func:`~mlflow_ckpt.catalog.deletion.discard_failed`).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModel

from mlflow_ckpt.catalog import models, tags
from mlflow_ckpt.catalog.checkpoint import Checkpoint
from mlflow_ckpt.catalog.deletion import discard_failed
from mlflow_ckpt.catalog.reader import read_checkpoint
from mlflow_ckpt.catalog.resolve import resolve
from mlflow_ckpt.catalog.runs import get_run
from mlflow_ckpt.codec import STRUCTURE_FILE, Manifest, read_manifest, verify_files
from mlflow_ckpt.codec.dcp_metadata import saved_tensors
from mlflow_ckpt.codec.dcp_store import StoreReader
from mlflow_ckpt.codec.layout import with_shared
from mlflow_ckpt.errors import (
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointWriteError,
    StateMismatchError,
)
from mlflow_ckpt.folder import CODE_DIR, MODEL_KEY, FolderSpec, flavor_config, write_folder
from mlflow_ckpt.folder.distributed import rank_dir, rank_manifest, read_root, shard_files
from mlflow_ckpt.manager.verification import verify_stored
from mlflow_ckpt.snapshot import plain_state, take_snapshot
from mlflow_ckpt.snapshot.sharded import decode_sharded
from mlflow_ckpt.snapshot.tree import decode, plain
from mlflow_ckpt.storage import Store, open_store, redact
from mlflow_ckpt.storage.prefix import PrefixStore
from mlflow_ckpt.storage.staging import scratch_dir

__all__ = ["average"]

logger = logging.getLogger(__name__)

_MLMODEL = "MLmodel"
Spec = tuple[str, tuple[int, ...]]  # dtype name ("float32"), shape


@dataclass(frozen=True)
class _Source:
    """One checkpoint to average: its record, LoggedModel and the ``model`` tensors' specs."""

    checkpoint: Checkpoint
    model: LoggedModel
    manifest: Manifest
    specs: dict[str, Spec]


def average(
    checkpoints: Sequence[Checkpoint | str],
    *,
    weights: Sequence[float] | None = None,
    run_id: str | None = None,
    client: MlflowClient | None = None,
) -> Checkpoint:
    """Write the (weighted) mean of the ``model`` weights of ``checkpoints`` as a new one.

    ``checkpoints``: two or more :class:`Checkpoint` records or URIs (``models:/m-...``,
    ``models:/<name>@<alias>``), single-process or distributed (DCP) alike. ``weights``:
    ``None`` for the plain mean, else one non-negative number per checkpoint (normalised to
    sum to 1). Floating-point tensors are accumulated in float32 (float64 in float64) and
    cast back to their own dtype; integer and bool tensors (BatchNorm's
    ``num_batches_tracked``) and non-tensor entries are the newest source's (highest step;
    ties: the newer checkpoint). Only ``state["model"]`` is averaged: the result holds no
    optimizer, scheduler or RNG state, so it is for inference, evaluation, promotion or
    fine-tuning from, not for resuming the run.

    Before any tensor is read, every source's key names, shapes and dtypes are compared,
    taken from its ``state.json`` and its manifest's tensor index (a distributed
    checkpoint's from its shard index), all verified: a mismatch raises
    :class:`~mlflow_ckpt.StateMismatchError` naming both URIs and the keys, and nothing is
    written.

    Memory: sources are read one at a time, each through the verified read path (every
    file's hash checked). Peak memory is about one float32 accumulator of the model plus
    one source: uncompressed safetensors sources are mapped views of their files, but a
    compressed or distributed source is decoded whole (its optimizer state too) before its
    model tensors are added; tensors are not streamed one by one.

    The average is logged in the newest source's run (or ``run_id``) at the newest source's
    step, with that source's ``model_factory``, ``model_kwargs`` and ``code/``, tagged
    ``mlflow_ckpt.trigger=average`` and ``mlflow_ckpt.averaged_from`` (JSON: each source's
    model ID, step and weight). It is not listed by :func:`~mlflow_ckpt.list_checkpoints`
    nor resumed from (see the module docstring); use the returned record or its URI.
    """
    client = client or MlflowClient()
    refs = list(checkpoints)
    if len(refs) < 2:
        raise CheckpointError(
            f"average needs at least 2 checkpoints, got {len(refs)}; pass several "
            "Checkpoint records or 'models:/m-...' URIs (e.g. list_checkpoints(run_id)[:3])."
        )
    normalised = _normalised(weights, len(refs))
    resolved = [resolve(ref, client) for ref in refs]
    with scratch_dir("average") as scratch:
        sources = [_source(model, scratch / str(i)) for i, model in enumerate(resolved)]
        _check_compatible(sources)
        newest = max(
            range(len(sources)),
            key=lambda i: (sources[i].checkpoint.step, sources[i].checkpoint.created_at),
        )
        spec = _rebuild_spec(sources[newest], scratch / "newest")  # (small files: first)
        averaged = _weighted_mean(sources, normalised, newest)
        return _log(client, sources, normalised, newest, averaged, spec, run_id)


def _normalised(weights: Sequence[float] | None, count: int) -> list[float]:
    """The weights summing to 1 (equal ones for ``None``), checked before anything is read."""
    if weights is None:
        return [1.0 / count] * count
    values = [float(w) for w in weights]
    if len(values) != count:
        raise ValueError(f"got {len(values)} weights for {count} checkpoints; give one each")
    if any(not math.isfinite(w) or w < 0 for w in values):
        raise ValueError(f"weights must be finite and non-negative, got {values}")
    total = sum(values)
    if total <= 0:
        raise ValueError("weights must not all be zero")
    return [w / total for w in values]


def _source(model: LoggedModel, scratch: Path) -> _Source:
    """Read a source's manifest (checked against its commit digest) and the keys, shapes
    and dtypes of its ``state["model"]``, with no tensor file read (:func:`_model_specs`)."""
    checkpoint = Checkpoint.from_logged_model(model)
    where = checkpoint.uri
    scratch.mkdir(parents=True, exist_ok=True)
    with open_store(model.artifact_location) as opened:
        manifest = read_manifest(opened, scratch, where, tags.manifest_digests(model.tags))
        state = _model_specs(with_shared(opened, manifest), manifest, scratch, where)
    specs = {
        str(k): (_dtype_name(v.dtype), tuple(v.shape))
        for k, v in (state.items() if isinstance(state, Mapping) else ())
        if isinstance(v, torch.Tensor)
    }
    if not specs:
        raise StateMismatchError(
            f"Checkpoint {where} (run {checkpoint.run_id}, step {checkpoint.step}) has no "
            f"tensors under state[{MODEL_KEY!r}], so there is nothing to average. Average "
            f"checkpoints saved with the network as state[{MODEL_KEY!r}]."
        )
    return _Source(checkpoint, model, manifest, specs)


def _model_specs(store: Store, manifest: Manifest, scratch: Path, where: str) -> Any:
    """``state["model"]`` with every tensor a stand-in of its dtype and shape (a scalar
    expanded, no memory): its node of the structure document (``state.json``, verified)
    decoded over the tensor index. So keys come from the document (tied weights, stored
    once, keep both their keys) and nothing large is read. A checkpoint written by several
    ranks takes its sharded entries' index from ``shards/metadata.json`` (verified), the rest
    from rank 0's own files, as :func:`~mlflow_ckpt.folder.distributed.read_distributed`."""
    if manifest.world_size:
        local = verify_files(store, manifest, scratch, where, [STRUCTURE_FILE])
        root = read_root(local[STRUCTURE_FILE], where)
        if MODEL_KEY in root.sharded:
            index = StoreReader(store, scratch, where, shard_files(manifest)).read_metadata()
            sharded = {
                name: _stand_in(md.properties.dtype, tuple(md.size))
                for name, md in saved_tensors(index).items()
            }
            return decode_sharded({MODEL_KEY: root.state[MODEL_KEY]}, sharded)[MODEL_KEY]
        store, manifest = PrefixStore(store, rank_dir(0)), rank_manifest(manifest, 0)
        scratch = scratch / rank_dir(0)
    local = verify_files(store, manifest, scratch, where, [manifest.structure_file])
    try:
        document = json.loads(local[manifest.structure_file].read_bytes())
        node = document["state"].get(MODEL_KEY)
        index = {t.name: _stand_in(getattr(torch, t.dtype), t.shape) for t in manifest.tensors}
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        raise CheckpointCorruptedError(
            f"{where}: {manifest.structure_file} or the manifest's tensor index cannot be "
            f"read ({type(exc).__name__}: {exc})",
            path=manifest.structure_file,
        ) from exc
    return plain(decode(node, index, MODEL_KEY))


def _stand_in(dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """A tensor of ``dtype`` and ``shape`` that takes no memory (one element, expanded)."""
    return torch.zeros((), dtype=dtype).expand(tuple(shape))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_compatible(sources: Sequence[_Source]) -> None:
    """Every source's keys, shapes and dtypes equal the first one's, or a clear error."""
    first = sources[0]
    for other in sources[1:]:
        _compare(first.checkpoint.uri, first.specs, other.checkpoint.uri, other.specs)


def _compare(uri_a: str, a: Mapping[str, Spec], uri_b: str, b: Mapping[str, Spec]) -> None:
    missing = sorted(set(a) - set(b))
    unexpected = sorted(set(b) - set(a))
    mismatched = sorted(k for k in set(a) & set(b) if a[k] != b[k])
    if not (missing or unexpected or mismatched):
        return
    problems = []
    if missing:
        problems.append(f"{_names(missing)} only in {uri_a}")
    if unexpected:
        problems.append(f"{_names(unexpected)} only in {uri_b}")
    for key in mismatched[:5]:
        (dtype_a, shape_a), (dtype_b, shape_b) = a[key], b[key]
        problems.append(
            f"{key!r} is {dtype_a}{list(shape_a)} in {uri_a} but {dtype_b}{list(shape_b)} "
            f"in {uri_b}"
        )
    raise StateMismatchError(
        f"Cannot average {uri_a} with {uri_b}: their state[{MODEL_KEY!r}] differ ("
        + "; ".join(problems)
        + "). Nothing was written. Average only checkpoints of one architecture (e.g. the "
        "last checkpoints of one run, or fine-tunings of one base model) saved with the same "
        "dtypes.",
        missing=missing,
        unexpected=unexpected,
        mismatched=mismatched,
    )


def _names(keys: Sequence[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:5])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > 5 else "")


def _weighted_mean(
    sources: Sequence[_Source], weights: Sequence[float], newest: int
) -> dict[str, Any]:
    """Accumulate each source's floating-point tensors in turn (one source decoded at a
    time), then cast each sum back to its dtype; the rest comes from the newest source."""
    sums: dict[str, torch.Tensor] = {}
    kept: dict[str, Any] = {}
    order: list[str] = []
    for index, (source, weight) in enumerate(zip(sources, weights, strict=True)):
        state = _model_state(source)
        if index == newest:
            order = list(state)
        for key, value in state.items():
            if _averaged(value):
                total = sums.get(key)
                if total is None:
                    total = sums[key] = torch.zeros(value.shape, dtype=_accumulator(value.dtype))
                total.add_(value, alpha=weight)
            elif index == newest:
                kept[key] = value.clone() if isinstance(value, torch.Tensor) else value
        del state  # drop this source's views (or decoded copy) before the next one
    dtypes = {key: spec[0] for key, spec in sources[newest].specs.items()}
    return {
        key: sums.pop(key).to(getattr(torch, dtypes[key])) if key in sums else kept[key]
        for key in order
    }


def _averaged(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _model_state(source: _Source) -> Mapping[str, Any]:
    """``state["model"]`` of one source, read and verified like ``load_training_state``,
    checked against the specs read before (:func:`_model_specs`): the same keys, shapes and
    dtypes, or the checkpoint contradicts its own index."""
    state = plain_state(read_checkpoint(source.model).decoded).get(MODEL_KEY)
    if not isinstance(state, Mapping):
        raise StateMismatchError(
            f"Checkpoint {source.checkpoint.uri}: state[{MODEL_KEY!r}] is not a state dict"
        )
    found = {
        str(k): (_dtype_name(v.dtype), tuple(v.shape))
        for k, v in state.items()
        if isinstance(v, torch.Tensor)
    }
    _compare(f"{source.checkpoint.uri} (its index)", source.specs, source.checkpoint.uri, found)
    return state


def _rebuild_spec(newest: _Source, scratch: Path) -> FolderSpec:
    """How the average is written: the newest source's format and compression, and what
    rebuilds its network (``model_factory``, ``model_kwargs``, ``code/``), read from that
    source's verified ``MLmodel`` and ``code/`` files."""
    listed = {f.path for f in newest.manifest.files}
    code = sorted(p for p in listed if p.startswith(f"{CODE_DIR}/"))
    wanted = [p for p in (_MLMODEL, *code) if p in listed]
    config: dict[str, Any] = {}
    code_paths: tuple[str, ...] = ()
    if wanted:
        scratch.mkdir(parents=True, exist_ok=True)
        with open_store(newest.model.artifact_location) as store:
            local = verify_files(store, newest.manifest, scratch, newest.checkpoint.uri, wanted)
        if _MLMODEL in local:
            config = flavor_config(local[_MLMODEL])
        if code:
            code_paths = _code_paths({p: local[p] for p in code}, scratch / "copy")
    return FolderSpec(
        format=newest.manifest.format,
        compression=newest.manifest.compression,
        model_factory=config.get("model_factory") or None,
        model_kwargs=dict(config.get("model_kwargs") or {}),
        code_paths=code_paths,
    )


def _code_paths(files: Mapping[str, Path], root: Path) -> tuple[str, ...]:
    """The verified ``code/`` files laid out again under ``root`` (a local store hands back
    its own paths, a remote one its downloads), as the code paths ``write_folder`` copies:
    each top-level entry of ``code/``."""
    for rel, source in files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return tuple(str(p) for p in sorted((root / CODE_DIR).iterdir()))


class _Weights:
    """The averaged state dict as a Stateful object: saved like a module's state, so
    ``load(uri, {"model": net})`` and the pyfunc loader restore it into a network."""

    def __init__(self, state: Mapping[str, Any]) -> None:
        self._state = state

    def state_dict(self) -> Mapping[str, Any]:
        return self._state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        raise NotImplementedError  # (never restored into: only saved)


def _provenance(
    sources: Sequence[_Source], weights: Sequence[float]
) -> tuple[dict[str, str], dict[str, str]]:
    """Tags and params that say where an average came from (the params show as columns)."""
    records = [
        {"model_id": s.checkpoint.model_id, "step": s.checkpoint.step, "weight": w}
        for s, w in zip(sources, weights, strict=True)
    ]
    params = {
        "averaged_from": ",".join(s.checkpoint.model_id for s in sources)[:6000],
        "averaged_steps": ",".join(str(s.checkpoint.step) for s in sources)[:6000],
        "averaged_weights": ",".join(f"{w:.6g}" for w in weights)[:6000],
    }
    return {tags.AVERAGED_FROM: json.dumps(records)}, params


def _log(
    client: MlflowClient,
    sources: Sequence[_Source],
    weights: Sequence[float],
    newest: int,
    averaged: Mapping[str, Any],
    spec: FolderSpec,
    run_id: str | None,
) -> Checkpoint:
    """Create the pending LoggedModel, write the folder (manifest last), verify the sizes
    and commit; any failure discards what was written and raises."""
    base = sources[newest].checkpoint
    run_id = run_id or base.run_id
    experiment_id = get_run(client, run_id).info.experiment_id
    extra_tags, extra_params = _provenance(sources, weights)
    model = models.create_pending(
        client,
        experiment_id=experiment_id,
        run_id=run_id,
        step=base.step,
        epoch=base.epoch,
        triggers=(tags.AVERAGE,),
        format=spec.format,
        name=tags.average_name(base.step),
        extra_tags=extra_tags,
        extra_params=extra_params,
    )
    where = f"{model.model_id} (average in run {run_id}, step {base.step})"
    store: Store | None = None
    try:
        store = open_store(model.artifact_location)
        manifest = _write(store, averaged, spec, model, run_id, base)
        verify_stored(store, manifest, "size", where)
        committed = models.commit(
            client,
            model,
            run_id=run_id,
            step=base.step,
            metrics={},
            timestamp_ms=int(time.time() * 1000),
            size_bytes=manifest.size_bytes,
            stored_bytes=manifest.stored_bytes,
            manifest_sha256=manifest.digest(),
        )
    except BaseException as exc:
        _discard(client, model, store)
        if not isinstance(exc, Exception):
            raise  # KeyboardInterrupt, SystemExit: cleaned up, the signal goes on
        raise CheckpointWriteError(
            f"Writing the average {where} to {redact(model.artifact_location)} failed "
            f"({type(exc).__name__}: {exc}). Nothing was committed and the sources are "
            "untouched; fix the cause (space, permissions, network) and average again."
        ) from exc
    if store is not None:
        store.close()
    logger.info(
        "Committed average %s of %d checkpoints (run %s, step %d, %.1f MB)",
        model.model_id,
        len(sources),
        run_id,
        base.step,
        manifest.size_bytes / 1e6,
    )
    return Checkpoint.from_logged_model(committed)


def _write(
    store: Store,
    averaged: Mapping[str, Any],
    spec: FolderSpec,
    model: LoggedModel,
    run_id: str,
    base: Checkpoint,
) -> Manifest:
    """The average's folder: ``state["model"]`` only (no RNG streams: the averaging
    process's would mean nothing), ``MLmodel``, ``code/``, the manifest last."""
    progress = {"step": base.step, "epoch": base.epoch, "metrics": {}}
    snapshot = take_snapshot(
        {MODEL_KEY: _Weights(averaged)}, progress, include_rng=False, copy=False
    )
    return write_folder(
        store,
        snapshot,
        spec,
        model_id=model.model_id,
        run_id=run_id,
        step=base.step,
        epoch=base.epoch,
        triggers=(tags.AVERAGE,),
    )


def _discard(client: MlflowClient, model: LoggedModel, store: Store | None) -> None:
    """Remove a failed average (best effort; what stays is tagged failed for ``gc``)."""
    try:
        if store is not None:
            store.close()
        discard_failed(client, model, store)
    except Exception as exc:
        logger.warning("Could not remove failed average %s yet: %s", model.model_id, exc)

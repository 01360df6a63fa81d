"""Resuming a distributed job on any number of ranks.

Rank 0 lists the run's committed checkpoints (newest first) and hands each candidate to
every rank. For one candidate, every rank:

1. reads and verifies (against the digest recorded at commit) the manifest, the root
   structure, the shard metadata and its own rank's files, and checks that the saved
   sharded tensors fit the live ones (names, global shapes, dtypes);
2. loads its shards through ``dcp.load`` into fresh buffers (DCP reshards: saved on 2
   ranks, loaded on 1 or 3), each shard file verified before it is read;
3. only when every rank got that far, applies: its own state, then the modules and
   optimizers through ``set_state_dict``.

If any rank fails in 1 or 2, nothing is applied anywhere; a corrupt checkpoint is warned
about, tagged ``corrupt`` by rank 0 and the next one is tried, as in a single process.

Rank ``r`` takes saved rank ``r``'s own state (RNG streams, sampler, extras). A rank that
did not exist when the checkpoint was saved takes rank 0's, but keeps its own fresh RNG
streams (copies of rank 0's would make every new rank draw the same numbers); saved ranks
beyond the new world are dropped. Both are warned about.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow import MlflowClient
from mlflow.entities import LoggedModel

from mlflow_ckpt.catalog import Checkpoint, models, resolve, tags
from mlflow_ckpt.catalog.lineage import fork_point
from mlflow_ckpt.catalog.queries import committed_models, newest_first_with_models
from mlflow_ckpt.codec import read_manifest
from mlflow_ckpt.codec.layout import with_shared
from mlflow_ckpt.codec.manifest import Manifest
from mlflow_ckpt.errors import (
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointNotFoundError,
)
from mlflow_ckpt.folder.distributed import RootDocument, read_rank, read_root, shard_files
from mlflow_ckpt.manager.distributed_write import own_failure
from mlflow_ckpt.manager.pipeline import checkpoint_from_json, checkpoint_to_json
from mlflow_ckpt.manager.ranks import RankError, RankGroup
from mlflow_ckpt.manager.resume import ResumePoint
from mlflow_ckpt.snapshot import DecodedState, restore
from mlflow_ckpt.snapshot.sharded import (
    ShardedSnapshot,
    apply_sharded,
    check_against,
    decode_sharded,
    empty_targets,
    frozen_holding_sharded,
    sharded_entries,
    take_sharded,
)
from mlflow_ckpt.storage import Store, open_store
from mlflow_ckpt.storage.staging import scratch_dir

if TYPE_CHECKING:
    from mlflow_ckpt.codec.dcp_store import StoreReader

logger = logging.getLogger(__name__)


# Errors that make a checkpoint unreadable (it is then skipped, as in one process).
_SKIPPABLE = {
    CheckpointCorruptedError.__name__,
    CheckpointNotFoundError.__name__,
    FileNotFoundError.__name__,
}


def _candidates(client: MlflowClient | None, run_id: str, ranks: RankGroup) -> list[Any]:
    """Rank 0's candidates, newest first, told to every rank (with the reason, on every
    rank, when there are none to tell: an incomplete fork, its source gone)."""
    listed: list[Any] = []
    refused: CheckpointError | None = None
    if ranks.is_leader:
        assert client is not None
        # (one listing: the manifest digests are in the listed models' tags)
        for ckpt, model in newest_first_with_models(committed_models(client, run_id)):
            listed.append(_candidate(ckpt, model))
        try:
            source = fork_point(client, run_id)  # a forked run: last, where it branched off
            if source is not None:
                listed.append(_candidate(source, resolve(source, client)))
        except CheckpointError as exc:
            refused = exc
    told = ranks.broadcast(
        {"listed": listed, "refused": None if refused is None else str(refused)},
        group=ranks.control,
        what=f"listing checkpoints of {run_id}",
    )
    if refused is not None:
        raise refused
    if told["refused"] is not None:
        raise CheckpointError(told["refused"])
    return told["listed"]


def _candidate(ckpt: Checkpoint, model: LoggedModel) -> dict[str, Any]:
    return {
        "checkpoint": checkpoint_to_json(ckpt),
        "sha256": list(tags.manifest_digests(model.tags)),
    }


def restore_distributed(
    client: MlflowClient | None,
    run_id: str,
    state: Mapping[str, Any],
    ranks: RankGroup,
    *,
    strict: bool,
) -> ResumePoint:
    """Restore the newest checkpoint of ``run_id`` that every rank can read; an empty point
    (and nothing changed) when the run has none.

    The point also carries, for the next incremental save, where each chunk lies in
    the restored checkpoint and which frozen parameters hold them as loaded: that save then
    references them unread, as any save after the first does."""
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    from mlflow_ckpt.codec.dcp_metadata import ChunkBase, chunk_key

    entries = sharded_entries(state)
    own_targets = {k: v for k, v in state.items() if k not in entries}
    for candidate in _candidates(client, run_id, ranks):
        ckpt = checkpoint_from_json(candidate["checkpoint"])
        where = f"{ckpt.uri} (run {run_id}, step {ckpt.step})"
        with scratch_dir("resume") as scratch:
            store = open_store(ckpt.artifact_location)
            read: _Read | None = None
            error: BaseException | None = None
            try:  # 1. read and check everything this rank needs
                read = _read(store, candidate["sha256"], scratch, where, state, ranks)
            except BaseException as exc:
                error = exc
            try:
                ranks.agree(error, group=ranks.control, what=f"reading {where}")
                # (agree raised unless every rank read its part: this one's is here)
                assert read is not None
                fresh = empty_targets(read.live.tensors)  # 2. every rank loads its shards
                try:
                    dcp_load(fresh, storage_reader=read.reader, process_group=ranks.control)
                except BaseException as exc:
                    error = own_failure(exc, ranks.rank)
                ranks.agree(error, group=ranks.control, what=f"loading {where}")
            except RankError as exc:
                # The same decision on every rank (the error kinds are everyone's): only a
                # damaged or missing checkpoint sends the job on to an older one, as in one
                # process; a state that does not fit, a dead rank, an unreachable store or
                # a bug would fail on the older ones too, or hide behind them.
                if not exc.kinds or not set(exc.kinds.values()) <= _SKIPPABLE:
                    if error is not None:
                        raise error from exc
                    raise CheckpointError(
                        f"Resuming run {run_id} from {where} failed on another rank; nothing "
                        f"was restored: {exc}"
                    ) from exc
                _skip(client, ckpt, run_id, exc, ranks)
                continue
            # 3. apply, now that every rank has everything
            root = read.root
            with_rng = ranks.rank < root.world_size
            restore(read.own, own_targets, strict=strict, restore_rng_streams=with_rng, where=where)
            apply_sharded(state, entries, decode_sharded(root.state, fresh))
            _warn_world_change(root.world_size, ranks, where)
            point = ResumePoint.of_progress(ckpt, root.progress)
            if ckpt.run_id != run_id:  # a fork's source: the first save is whole
                return point
            chunks = {chunk_key(index): at for index, at in read.reader.locations.items()}
            return dataclasses.replace(
                point,
                manifest=read.manifest,
                frozen=frozen_holding_sharded(state, entries, fresh),
                chunk_base=ChunkBase(chunks, dict(read.reader.files)),
            )
    return ResumePoint()


@dataclasses.dataclass(frozen=True)
class _Read:
    """What step 1 read and checked of one candidate on this rank."""

    manifest: Manifest
    root: RootDocument
    own: DecodedState  # this rank's own state (rank 0's on a rank the save did not have)
    reader: StoreReader  # the sharded tensors, each file verified as DCP reads it
    live: ShardedSnapshot  # the live sharded state the saved one must fit


def _read(
    store: Store,
    sha256: Sequence[str],
    scratch: Path,
    where: str,
    state: Mapping[str, Any],
    ranks: RankGroup,
) -> _Read:
    from mlflow_ckpt.codec.dcp_metadata import saved_tensors

    manifest = read_manifest(store, scratch, where, sha256)
    store = with_shared(store, manifest)  # incremental: chunks in the shared area
    read = _prepare(store, manifest, scratch, where, state, ranks)
    saved = {
        name: (md.properties.dtype, tuple(md.size))
        for name, md in saved_tensors(read.reader.read_metadata()).items()
    }
    check_against(read.live, saved, where)
    return read


def _prepare(
    store: Store,
    manifest: Manifest,
    scratch: Path,
    where: str,
    state: Mapping[str, Any],
    ranks: RankGroup,
) -> _Read:
    from mlflow_ckpt.codec import verify_files
    from mlflow_ckpt.codec.dcp_store import StoreReader

    if not manifest.world_size:
        raise CheckpointError(
            f"{where} was written by a single process; under torch.distributed a run resumes "
            "from checkpoints written by a distributed job. Load it in one process "
            "(mlflow_ckpt.load_training_state) and start a new distributed run from it."
        )
    local = verify_files(store, manifest, scratch, where, [manifest.structure_file])
    root = read_root(local[manifest.structure_file], where)
    own_rank = ranks.rank if ranks.rank < root.world_size else 0
    own = read_rank(store, manifest, own_rank, scratch, where)
    entries = sharded_entries(state)
    if set(entries) != set(root.sharded):
        raise CheckpointError(
            f"{where} holds sharded entries {sorted(root.sharded)}, the state has "
            f"{sorted(entries)}; pass the same modules and optimizers that were saved."
        )
    live = take_sharded(state, entries, copy=False)
    reader = StoreReader(store, scratch, where, shard_files(manifest))
    return _Read(manifest, root, own, reader, live)


def _skip(
    client: MlflowClient | None, ckpt: Checkpoint, run_id: str, exc: RankError, ranks: RankGroup
) -> None:
    message = f"Skipping checkpoint {ckpt.uri} (step {ckpt.step}) of run {run_id}: {exc}"
    if ranks.is_leader:
        warnings.warn(message, stacklevel=4)
        if client is not None and CheckpointCorruptedError.__name__ in exc.kinds.values():
            models.mark_corrupt(client, ckpt.model_id)
    else:
        logger.warning("%s", message)


def _warn_world_change(saved_world: int, ranks: RankGroup, where: str) -> None:
    if ranks.world_size == saved_world:
        return
    if ranks.rank >= saved_world:
        message = (
            f"Rank {ranks.rank} did not exist when {where} was saved on {saved_world} ranks: "
            "it took rank 0's own state (sampler, scheduler, extras) and kept fresh random "
            "streams (Python, NumPy, torch) of its own."
        )
    elif ranks.is_leader and saved_world > ranks.world_size:
        message = (
            f"{where} was saved on {saved_world} ranks and resumes on {ranks.world_size}: the "
            f"own state (RNG streams, sampler, extras) of saved ranks {ranks.world_size}.."
            f"{saved_world - 1} was not restored anywhere. Sharded modules and optimizers "
            "were resharded in full."
        )
    else:
        return
    logger.warning("%s", message)
    warnings.warn(message, stacklevel=4)

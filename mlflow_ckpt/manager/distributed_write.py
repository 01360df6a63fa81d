"""The save strategy of a distributed job: every rank writes its part, rank 0 the root.

:func:`.pipeline.write_checkpoint` runs the protocol (rank 0 creates the LoggedModel, every
rank writes and reports, rank 0 commits or discards, every rank learns the outcome); this
strategy says what each rank writes:

- its own state (RNG streams, sampler, scheduler, extras) under ``ranks/<rank>/``;
- its shards of the modules and optimizers through DCP (``dcp.save`` on our commit group
  plans who writes which replicated tensor), which also takes part in DCP's collectives
  when this rank already failed, so that no rank waits for it;
- on rank 0, once every rank reported its files: ``state.json``, ``MLmodel`` and the
  manifest (:func:`~mlflow_ckpt.folder.distributed.write_root`).

A rank killed mid-save leaves the others to time out in the report step (the group's
timeout); its partial files are cleaned by the next resume or gc.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from mlflow.entities import LoggedModel

from mlflow_ckpt.catalog.checkpoint import Checkpoint
from mlflow_ckpt.codec import Manifest
from mlflow_ckpt.codec.manifest import SHARED_PREFIX
from mlflow_ckpt.folder import FolderSpec
from mlflow_ckpt.folder.distributed import RankFiles, write_rank_files, write_root
from mlflow_ckpt.manager.pipeline import SaveJob
from mlflow_ckpt.manager.ranks import RankGroup
from mlflow_ckpt.snapshot import Snapshot, first_nonfinite, take_snapshot
from mlflow_ckpt.snapshot.changes import History, Seen
from mlflow_ckpt.snapshot.sharded import ShardedSnapshot, sharded_entries, take_sharded
from mlflow_ckpt.storage import Store
from mlflow_ckpt.storage.routed import RoutedStore

if TYPE_CHECKING:
    from mlflow_ckpt.codec.dcp_metadata import ChunkBase
    from mlflow_ckpt.codec.dcp_store import StoreWriter
    from mlflow_ckpt.manager.resume import ResumePoint


class ShardedSave:
    """Every rank of a job writes its own state and its DCP shards of every checkpoint."""

    def __init__(
        self,
        state: Mapping[str, Any],
        ranks: RankGroup,
        spec: FolderSpec,
        run_id: str,
        incremental: bool,
    ) -> None:
        self.ranks, self.state, self.spec, self.run_id = ranks, state, spec, run_id
        self.incremental = incremental  # (rank 0 alone knows the shared area's URI)
        # modules and optimizers go through DCP, the rest is this rank's own
        self.entries = sharded_entries(state)
        self.own = {k: v for k, v in state.items() if k not in self.entries}
        self.chunk_base: ChunkBase | None = None  # where this rank's previous chunks lie
        self.chunk_seen: dict[str, Seen] = {}  # ... and what that save's snapshot saw
        self._writer: StoreWriter | None = None  # the part in flight's shard writer
        self._shared = False  # ... and whether it wrote into the run's shared area

    def snapshot(
        self, progress: Mapping[str, Any], *, copy: bool, buffers: Any, whole: bool
    ) -> tuple[Snapshot, ShardedSnapshot | None]:
        snapshot = take_snapshot(self.own, progress, copy=copy, buffers=buffers)
        history = None
        if self.incremental:
            names: frozenset[str] = frozenset()
            if self.chunk_base is not None and not whole:
                names = self.chunk_base.shared_names()
            history = History(self.chunk_seen, names)
        sharded = take_sharded(
            self.state, self.entries, copy=copy, buffers=buffers, history=history
        )
        return snapshot, sharded

    def first_nonfinite(self, job: SaveJob) -> str | None:
        from torch.distributed.tensor import DTensor

        assert job.sharded is not None
        local = {
            k: t.to_local() if isinstance(t, DTensor) else t for k, t in job.sharded.tensors.items()
        }
        return first_nonfinite(Snapshot({}, local)) or first_nonfinite(job.snapshot)

    def write_part(
        self, store: Store | None, job: SaveJob, model_id: str, before_manifest: Callable[[], None]
    ) -> dict[str, Any]:
        error: BaseException | None = None
        own = RankFiles((), ())
        self._writer, self._shared = None, isinstance(store, RoutedStore)
        try:
            if store is None:
                raise ValueError("no store to write to")  # (opening it failed: that wins)
            own = write_rank_files(store, self.ranks.rank, job.snapshot, self.spec)
        except BaseException as exc:
            error = exc
        try:  # collective: taken part in even after a failure
            shared_dir = f"{SHARED_PREFIX}{model_id}" if self._shared else None
            base = None if job.self_contained else self.chunk_base
            self._writer = _save_shards(store, job, self.ranks, self.spec, shared_dir, base)
        except BaseException as exc:
            error = error or exc
        if error is not None:
            raise error
        assert store is not None
        store.flush()
        writer = self._writer
        shards, raw = (list(writer.files), writer.raw_bytes) if writer else ([], 0)
        return RankFiles((*own.files, *shards), own.tensors, raw).to_json()

    def write_root(
        self,
        store: Store,
        job: SaveJob,
        model: LoggedModel,
        parts: list[dict[str, Any]],
        before_manifest: Callable[[], None],
    ) -> Manifest:
        assert job.sharded is not None
        return write_root(
            store,
            job.sharded,
            job.progress,
            self.spec,
            [RankFiles.from_json(part) for part in parts],
            model_id=model.model_id,
            run_id=self.run_id,
            step=job.step,
            epoch=job.epoch,
            metrics=job.metrics,
            triggers=job.triggers,
            created_at=job.timestamp_ms / 1000,
            before_manifest=before_manifest,
            shared_uri=store.shared.uri if isinstance(store, RoutedStore) else None,
        )

    def committed(self, job: SaveJob, checkpoint: Checkpoint) -> None:
        writer = self._writer
        self.chunk_base = writer.written if writer is not None and self._shared else None
        changes = job.sharded.changes if job.sharded is not None else None
        self.chunk_seen = changes.seen if changes is not None else {}
        self._writer = None

    def resumed(self, point: ResumePoint) -> None:
        # (only rank 0 knows the shared URI, but the run's own checkpoints, all a resume
        # restores, store there)
        if self.incremental:
            self.chunk_base, self.chunk_seen = point.chunk_base, dict(point.frozen)

    def protected(self, last: Checkpoint | None) -> tuple[str, ...]:
        return last.shared if last is not None else ()  # every rank's newest chunks


def _save_shards(
    store: Any,
    job: SaveJob,
    ranks: RankGroup,
    spec: FolderSpec,
    shared_dir: str | None,
    base: ChunkBase | None,
) -> StoreWriter | None:
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    from mlflow_ckpt.codec.dcp_store import StoreWriter

    assert job.sharded is not None
    changes = job.sharded.changes
    writer = StoreWriter(
        store,
        spec.compression,
        spec.compression_level,
        shared_dir=shared_dir,
        base=base,
        frozen=changes.frozen if changes is not None else frozenset(),
        reused=changes.reused if changes is not None else frozenset(),
    )
    try:
        dcp_save(job.sharded.tensors, storage_writer=writer, process_group=ranks.commit)
    except BaseException as exc:
        mine = own_failure(exc, ranks.rank)
        if mine is not None:
            raise mine from exc
        return None  # another rank failed: it reports its own error
    return writer


def own_failure(exc: BaseException, rank: int) -> BaseException | None:
    """This rank's own error inside DCP's collective ``CheckpointException`` (which every
    rank raises when any rank failed), or ``exc`` itself if it is not one."""
    from torch.distributed.checkpoint.api import CheckpointException

    if not isinstance(exc, CheckpointException):
        return exc
    failure = exc.failures.get(rank)
    return None if failure is None else failure[0]

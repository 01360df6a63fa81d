"""The ranks of a distributed job, as the manager sees them: who talks to MLflow, and how
the others hear what it decided.

Rank 0 is the only one that talks to MLflow. Everything the other ranks need from it (the
run, each save's folder, each step's decision, each commit's outcome) travels as small JSON
messages over process groups of our own, on gloo, so that:

- a background commit never shares a group with the training's collectives (NCCL or gloo),
  which could deadlock or interleave them;
- the training thread (decisions at ``step()``) and the background worker (the commit
  protocol) never share one either: collectives on one group must be issued in the same
  order on every rank, and two threads could not promise that.

Messages are JSON bytes in uint8 tensors: nothing is pickled between ranks either.

A process without a process group is a world of one (:meth:`RankGroup.alone`): its
collectives are local calls, so a single-process save runs the very same commit protocol
as a distributed one (the pattern of DCP's ``_DistWrapper``).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from mlflow_ckpt.errors import CheckpointError

logger = logging.getLogger(__name__)

# How long a rank waits for the others in one step of the commit protocol (the slowest
# rank's upload included), or for rank 0's decision; MLFLOW_CKPT_RANK_TIMEOUT_S overrides.
DEFAULT_TIMEOUT_S = 1800.0
T = TypeVar("T")


class RankError(CheckpointError):
    """A rank could not take part (it failed, died or timed out).

    ``kinds``: the type name of each failed rank's error (:meth:`RankGroup.agree`), the same
    on every rank, so every rank takes the same decision on it; empty when a rank died or
    timed out."""

    def __init__(self, message: str, kinds: Mapping[int, str] | None = None) -> None:
        super().__init__(message)
        self.kinds = dict(kinds or {})


@dataclass
class RankGroup:
    """This process's rank in the job, with the manager's two private groups."""

    rank: int
    world_size: int
    control: Any  # training thread: decisions, run setup, resume
    commit: Any  # background worker: the save protocol
    timeout_s: float

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @classmethod
    def alone(cls) -> RankGroup:
        """This process as a world of one: no groups, every collective a local call."""
        return cls(0, 1, None, None, 0.0)

    @property
    def is_alone(self) -> bool:
        return self.world_size == 1 and self.commit is None

    @classmethod
    def detect(cls, timeout_s: float | None = None) -> RankGroup | None:
        """The job's ranks if ``torch.distributed`` is initialized, else ``None``.

        Called on every rank (it creates the groups, a collective call).
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return None
        if timeout_s is None:
            timeout_s = float(os.environ.get("MLFLOW_CKPT_RANK_TIMEOUT_S", DEFAULT_TIMEOUT_S))
        timeout = datetime.timedelta(seconds=timeout_s)
        control = dist.new_group(backend="gloo", timeout=timeout)
        commit = dist.new_group(backend="gloo", timeout=timeout)
        return cls(dist.get_rank(), dist.get_world_size(), control, commit, timeout_s)

    def _collective(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except RuntimeError as exc:  # gloo: a peer died, closed its end, or timed out
            raise RankError(
                f"rank {self.rank}: another rank did not take part in {what} within "
                f"{self.timeout_s:.0f}s (it failed, was killed or is stuck): {exc}"
            ) from exc

    def broadcast(self, value: Any, *, group: Any, what: str) -> Any:
        """Rank 0's ``value`` (JSON-able), on every rank."""
        import torch.distributed as dist

        if self.is_alone:
            return value

        def run() -> Any:
            data = json.dumps(value).encode() if self.is_leader else b""
            size = torch.tensor([len(data)], dtype=torch.int64)
            dist.broadcast(size, src=0, group=group)
            buffer = (
                torch.frombuffer(bytearray(data), dtype=torch.uint8)
                if self.is_leader and data
                else torch.empty(int(size.item()), dtype=torch.uint8)
            )
            dist.broadcast(buffer, src=0, group=group)
            return value if self.is_leader else json.loads(buffer.numpy().tobytes())

        return self._collective(what, run)

    def all_gather(self, value: Any, *, group: Any, what: str) -> list[Any]:
        """Every rank's ``value`` (JSON-able), in rank order, on every rank."""
        import torch.distributed as dist

        if self.is_alone:
            return [value]

        def run() -> list[Any]:
            data = json.dumps(value).encode()
            sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
            dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64), group=group)
            longest = max(int(s.item()) for s in sizes)
            mine = torch.zeros(longest, dtype=torch.uint8)
            if data:
                mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            parts = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.world_size)]
            dist.all_gather(parts, mine, group=group)
            return [
                json.loads(p[: int(s.item())].numpy().tobytes())
                for p, s in zip(parts, sizes, strict=True)
            ]

        return self._collective(what, run)

    def agree(self, error: BaseException | None, *, group: Any, what: str) -> None:
        """Every rank reports whether its part of ``what`` worked; if any failed, every rank
        raises :class:`RankError` naming the ranks that failed and why."""
        report = None if error is None else [type(error).__name__, str(error)]
        reports = self.all_gather(report, group=group, what=what)
        failed = {r: m for r, m in enumerate(reports) if m is not None}
        if failed:
            detail = "; ".join(f"rank {r}: {kind}: {m}" for r, (kind, m) in failed.items())
            raise RankError(
                f"{what} failed on rank {', '.join(map(str, failed))} ({detail})",
                {r: kind for r, (kind, _) in failed.items()},
            )

    def close(self) -> None:
        """Destroy the manager's two groups, once every rank is done with them.

        Each group holds threads and a connection to every other rank, so a process that
        opens many managers (one ``fit`` per trial, say) would otherwise keep them all until
        the job destroys its default group. A rank may only destroy a group when every rank
        has left it (a peer could still be receiving the last message), hence a barrier
        first; if a rank never comes (it failed or died), the groups are left to the job's
        own ``destroy_process_group()``.
        """
        import torch.distributed as dist

        if self.is_alone:
            return
        try:
            self._collective("closing the manager", lambda: dist.barrier(group=self.control))
        except (RankError, ValueError) as exc:  # ValueError: the job destroyed them already
            logger.warning("Leaving the checkpoint manager's process groups open: %s", exc)
            return
        for group in (self.commit, self.control):
            with contextlib.suppress(ValueError):  # (already destroyed)
                dist.destroy_process_group(group)

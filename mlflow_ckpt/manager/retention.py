"""Which checkpoints to keep: small composable policies, applied by MLflow queries.

A policy looks at the committed checkpoints of a run (as MLflow reports them, not a local
list) and names the ones it wants to keep; a checkpoint survives if any policy keeps it.
On top of every policy: the newest checkpoint is always kept, so is any checkpoint a
registered model version points to or that is pinned (``mlflow_ckpt.pinned``, e.g. the one
before a loss spike), and if MLflow cannot be asked, nothing is deleted.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from mlflow import MlflowClient

from mlflow_ckpt.catalog import tags
from mlflow_ckpt.catalog.archive import archive_checkpoint
from mlflow_ckpt.catalog.checkpoint import Checkpoint
from mlflow_ckpt.catalog.deletion import delete_checkpoint, is_pinned, is_registered
from mlflow_ckpt.catalog.queries import committed_models
from mlflow_ckpt.catalog.shared import release_groups

logger = logging.getLogger(__name__)


class RetentionPolicy(Protocol):
    """Names the checkpoints (by model ID) a policy wants to keep.

    A user's own policy needs only this method; pass it as ``CheckpointManager(...,
    retention=MyPolicy())``. On top of any policy the newest checkpoint and registered ones
    are kept.
    """

    def keep(self, checkpoints: Sequence[Checkpoint]) -> set[str]: ...


@dataclass(frozen=True)
class KeepLastN:
    """Keep the ``n`` checkpoints with the highest steps."""

    n: int

    def keep(self, checkpoints: Sequence[Checkpoint]) -> set[str]:
        newest = sorted(checkpoints, key=lambda c: (c.step, c.created_at), reverse=True)
        return {c.model_id for c in newest[: self.n]}


@dataclass(frozen=True)
class KeepBestN:
    """Keep the ``n`` checkpoints with the best ``metric`` *at their own step*.

    NaN and infinite values never count as good; ties go to the newer step.
    """

    n: int
    metric: str
    mode: str = "min"

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', not {self.mode!r}")

    def keep(self, checkpoints: Sequence[Checkpoint]) -> set[str]:
        sign = 1.0 if self.mode == "min" else -1.0
        scored = [(c.metric(self.metric), c) for c in checkpoints]
        ranked = sorted(
            ((v, c) for v, c in scored if v is not None),
            key=lambda vc: (sign * vc[0], -vc[1].step),
        )
        return {c.model_id for _, c in ranked[: self.n]}


@dataclass(frozen=True)
class KeepEveryNSteps:
    """Keep forever the checkpoints of steps ``n-1, 2n-1, ...`` (milestones).

    Incremental saves write a milestone self-contained (see :func:`is_milestone`)."""

    n: int

    def keep(self, checkpoints: Sequence[Checkpoint]) -> set[str]:
        return {c.model_id for c in checkpoints if self.keeps_step(c.step)}

    def keeps_step(self, step: int) -> bool:
        return (step + 1) % self.n == 0


@dataclass(frozen=True)
class KeepAny:
    """The union of several policies: keep what any of them keeps."""

    policies: tuple[RetentionPolicy, ...]

    def keep(self, checkpoints: Sequence[Checkpoint]) -> set[str]:
        kept: set[str] = set()
        for policy in self.policies:
            kept |= policy.keep(checkpoints)
        return kept


@dataclass(frozen=True)
class ArchiveAfterN:
    """Retention's third outcome, beside keep and delete: **archive**.

    A checkpoint kept *only* as a milestone (by :class:`KeepEveryNSteps`, not by any other
    rule) and older than the ``n`` newest checkpoints is moved to the store's cold class in
    place (see :mod:`mlflow_ckpt.catalog.archive`): it stays listed and loadable, and costs
    less to keep.
    """

    n: int

    def archive(self, checkpoints: Sequence[Checkpoint], policy: RetentionPolicy) -> set[str]:
        """Model IDs of the checkpoints of ``checkpoints`` to be archived under ``policy``."""
        members = list(policy_members(policy))
        milestones = [p for p in members if isinstance(p, KeepEveryNSteps)]
        if not milestones:
            return set()
        kept = set().union(*(p.keep(checkpoints) for p in milestones))
        for other in members:
            if not isinstance(other, KeepEveryNSteps):
                kept -= set(other.keep(checkpoints))
        newest = sorted(checkpoints, key=lambda c: (c.step, c.created_at), reverse=True)
        kept -= {c.model_id for c in newest[: self.n]}
        return {c.model_id for c in checkpoints if c.model_id in kept and c.tier != tags.ARCHIVE}


def is_milestone(policy: RetentionPolicy | None, step: int) -> bool:
    """Whether ``policy`` keeps the checkpoint of ``step`` forever (``keep_every_n_steps``).

    Incremental saves write such a checkpoint whole into its own folder, referencing no
    shared file, and the save after it starts a new shared group. A damaged shared file
    then affects only the checkpoints since the newest milestone, and resume falls back to
    that milestone: without this, every checkpoint of a run would reference the group its
    first save wrote, and one flipped byte there would leave nothing to resume from."""
    if policy is None:
        return False
    return any(
        isinstance(p, KeepEveryNSteps) and p.keeps_step(step) for p in policy_members(policy)
    )


class Milestones:
    """Per save of an incremental run: is it a milestone written whole? Warns once if
    every save is whole.

    A milestone references no shared file and the save after it starts a new shared group
    (see :func:`is_milestone`), so both write the whole state. With at most one save
    between two milestones no save ever reuses a byte: ``incremental=True`` then costs
    hashing and buys nothing. The two settings that cause it (how often saves happen, how
    often a milestone is kept) are made apart and interact only at run time, so the first
    time it happens is said once, with the steps, rather than left for the storage bill.
    """

    def __init__(self, policy: RetentionPolicy | None, incremental: bool, run_id: str) -> None:
        self._policy = policy if incremental else None
        self._run_id = run_id
        self._newest: int | None = None  # the step of the newest milestone seen
        self._since = 0  # saves since then
        self._warned = False

    def whole(self, step: int) -> bool:
        """Whether the save of ``step`` is a milestone, written whole into its own folder."""
        if not is_milestone(self._policy, step):
            self._since += 1
            return False
        if self._newest is not None and self._since <= 1 and not self._warned:
            self._warned = True
            warnings.warn(
                f"Run {self._run_id}: the checkpoints of steps {self._newest} and {step} are "
                f"both milestones (keep_every_n_steps) with {self._since} save between them. "
                "An incremental run writes each milestone and the save after it whole, so "
                "every save of this run writes the whole state. Keep milestones at least "
                "three saves apart (a larger keep_every_n_steps, or more frequent saves).",
                stacklevel=5,  # the caller of step() or save()
            )
        self._newest, self._since = step, 0
        return True


def policy_members(policy: RetentionPolicy) -> Iterator[RetentionPolicy]:
    """The rules a policy is the union of (nested ``KeepAny`` flattened)."""
    if isinstance(policy, KeepAny):
        for member in policy.policies:
            yield from policy_members(member)
    else:
        yield policy


def build_policy(
    *,
    keep_last_n: int | None = None,
    keep_best_n: int | None = None,
    keep_every_n_steps: int | None = None,
    metric: str | None = None,
    mode: str = "min",
) -> RetentionPolicy | None:
    """The policy for the manager's ``keep_*`` arguments; ``None`` keeps everything."""
    policies: list[RetentionPolicy] = []
    if keep_last_n is not None:
        policies.append(KeepLastN(keep_last_n))
    if keep_best_n is not None:
        if not metric:
            raise ValueError("keep_best_n needs a metric: pass monitor='val_loss' (or metric=)")
        policies.append(KeepBestN(keep_best_n, metric, mode))
    if keep_every_n_steps is not None:
        policies.append(KeepEveryNSteps(keep_every_n_steps))
    if not policies:
        return None
    return policies[0] if len(policies) == 1 else KeepAny(tuple(policies))


@dataclass
class RetentionResult:
    """What a retention pass decided (and did, unless it was a dry run)."""

    kept: list[Checkpoint] = field(default_factory=list)
    deleted: list[Checkpoint] = field(default_factory=list)
    protected: list[Checkpoint] = field(default_factory=list)
    archived: list[Checkpoint] = field(default_factory=list)  # (also in ``kept``)


def apply_retention(
    client: MlflowClient,
    run_id: str,
    policy: RetentionPolicy,
    *,
    dry_run: bool = False,
    experiment_id: str | None = None,
    archive: ArchiveAfterN | None = None,
) -> RetentionResult:
    """Delete the committed checkpoints of ``run_id`` that ``policy`` does not keep (and
    archive those ``archive`` names)."""
    try:
        models = committed_models(client, run_id, experiment_id=experiment_id)
    except Exception as exc:  # fail safe: never delete on a partial view
        logger.warning("Retention skipped for run %s: could not list checkpoints (%s)", run_id, exc)
        return RetentionResult()
    checkpoints = [Checkpoint.from_logged_model(m) for m in models]
    protected = {m.model_id for m in models if is_registered(m) or is_pinned(m)}
    return enforce(client, checkpoints, protected, policy, dry_run=dry_run, archive=archive)


def enforce(
    client: MlflowClient,
    checkpoints: Sequence[Checkpoint],
    protected: set[str],
    policy: RetentionPolicy,
    *,
    dry_run: bool = False,
    archive: ArchiveAfterN | None = None,
) -> RetentionResult:
    """Delete those of ``checkpoints`` that ``policy`` does not keep (never the newest, nor
    one in ``protected``; ``delete_checkpoint`` re-checks registration and pins itself)."""
    result = RetentionResult()
    if not checkpoints:
        return result
    keep = set(policy.keep(list(checkpoints)))  # a user's policy may return any iterable
    keep.add(max(checkpoints, key=lambda c: (c.step, c.created_at)).model_id)
    for ckpt in sorted(checkpoints, key=lambda c: c.step):
        if ckpt.model_id in keep:
            result.kept.append(ckpt)
        elif ckpt.model_id in protected:
            result.protected.append(ckpt)
        elif dry_run:
            result.deleted.append(ckpt)
        else:
            try:
                deleted = delete_checkpoint(client, ckpt.model_id)
            except Exception as exc:  # one failed deletion must not stop the others
                logger.warning("Could not delete checkpoint %s: %s", ckpt.uri, exc)
                result.kept.append(ckpt)
                continue
            (result.deleted if deleted else result.protected).append(ckpt)
    if archive is not None:
        archive_due(client, result, protected, policy, archive, dry_run=dry_run)
    return result


def archive_due(
    client: MlflowClient,
    result: RetentionResult,
    protected: set[str],
    policy: RetentionPolicy,
    archive: ArchiveAfterN,
    *,
    dry_run: bool = False,
) -> None:
    """Archive those of ``result.kept`` that ``archive`` names (never a protected one)."""
    chosen = archive.archive(result.kept, policy) - protected
    for ckpt in result.kept:
        if ckpt.model_id in chosen:
            _archive(client, ckpt, result, dry_run)


def _archive(client: MlflowClient, ckpt: Checkpoint, result: RetentionResult, dry: bool) -> None:
    if dry:
        result.archived.append(ckpt)
        return
    try:
        archive_checkpoint(ckpt, client=client)
    except Exception as exc:  # stays hot; the next pass tries again
        logger.warning("Could not archive checkpoint %s: %s", ckpt.uri, exc)
        return
    result.archived.append(dataclasses.replace(ckpt, tier=tags.ARCHIVE))


class RunRetention:
    """Retention after each save without listing the run's checkpoints every time.

    The first pass lists them (paged MLflow queries); after that this writer, which holds
    the run's lease, knows every checkpoint that appears (its own commits) and every one
    that goes (its own deletions), so each later pass decides on that list: no query whose
    cost grows with the run. A checkpoint registered or pinned meanwhile is still never
    deleted: ``delete_checkpoint`` reads the model fresh and refuses it. ``resume`` and
    ``gc`` start from a full listing again.
    """

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        experiment_id: str,
        policy: RetentionPolicy,
        shared_uri: str | None = None,
        protected_groups: Callable[[], Collection[str]] = tuple,
        archive: ArchiveAfterN | None = None,
    ) -> None:
        self.client, self.run_id, self.experiment_id = client, run_id, experiment_id
        self.policy = policy
        self.archive = archive
        # Incremental saves: the run's shared area, and the groups the next save may use.
        self.shared_uri = shared_uri
        self.protected_groups = protected_groups
        self._known: dict[str, Checkpoint] | None = None
        self._protected: set[str] = set()

    def committed(self, ckpt: Checkpoint) -> None:
        """This writer committed ``ckpt``."""
        if self._known is not None:
            self._known[ckpt.model_id] = ckpt

    def apply(self) -> RetentionResult:
        """Delete what the policy does not keep (archiving is :meth:`archive_due`, a job of
        its own)."""
        if self._known is None:
            try:
                models = committed_models(
                    self.client, self.run_id, experiment_id=self.experiment_id
                )
            except Exception as exc:  # fail safe: never delete on a partial view
                logger.warning(
                    "Retention skipped for run %s: could not list checkpoints (%s)",
                    self.run_id,
                    exc,
                )
                return RetentionResult()
            self._known = {m.model_id: Checkpoint.from_logged_model(m) for m in models}
            self._protected = {m.model_id for m in models if is_registered(m) or is_pinned(m)}
        result = enforce(
            self.client,
            list(self._known.values()),
            self._protected,
            self.policy,
        )
        for ckpt in result.deleted:
            self._known.pop(ckpt.model_id, None)
        self._protected.update(c.model_id for c in result.protected)
        if self.shared_uri is not None and result.deleted:
            release_groups(
                self.shared_uri,
                {g for c in result.deleted for g in c.shared},
                (c.shared for c in self._known.values()),
                self.protected_groups(),
            )
        return result

    def archive_due(self) -> None:
        """Archive the milestones that are due, as of the last :meth:`apply`.

        Recompressing a milestone on a local store takes seconds per GB, so the manager
        runs this as a background job of its own, after the save's job: the next snapshot
        waits for the save, never for the archiving."""
        if self.archive is None or self._known is None:
            return
        result = RetentionResult(kept=list(self._known.values()))
        archive_due(self.client, result, self._protected, self.policy, self.archive)
        for ckpt in result.archived:
            self._known[ckpt.model_id] = ckpt

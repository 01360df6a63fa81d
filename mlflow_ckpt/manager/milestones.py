"""Which saves of an incremental run are written whole, and a warning when that is all of them.

A milestone (a checkpoint ``keep_every_n_steps`` keeps forever) of an incremental run
references no shared file, and the save after it starts a new shared group (see
:func:`~.retention.is_milestone`), so both write the whole state. With at most one save
between two milestones no save ever reuses a byte: ``incremental=True`` then costs hashing
and buys nothing. The two settings that cause it (how often saves happen, how often a
milestone is kept) are made apart and interact only at run time, so the first time it
happens is said once, with the steps, rather than left for the storage bill to show.
"""

from __future__ import annotations

import warnings

from mlflow_ckpt.manager.retention import RetentionPolicy, is_milestone


class Milestones:
    """Per save: is it a milestone written whole? Warns once if every save is whole."""

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

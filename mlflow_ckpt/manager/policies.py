"""The manager's decisions at each step, in one place: triggers and the spike watch.

Everything here is state the manager carries across a resume (saved in each checkpoint's
progress record): the triggers' own state (best value, measured save cost) and the spike
watch's recent values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlflow_ckpt.catalog.tags import PREEMPTED
from mlflow_ckpt.manager.options import ManagerOptions
from mlflow_ckpt.manager.ranks import RankGroup
from mlflow_ckpt.manager.spikes import SpikeWatch
from mlflow_ckpt.manager.triggers import StepInfo, TriggerSet


@dataclass(frozen=True)
class Decision:
    """What the policies decided for one step."""

    fired: tuple[str, ...]  # names of the triggers due: save when not empty
    spike: str | None  # how this step starts a spike (pin the checkpoint before it)
    reports: dict[str, float]  # metrics the policies log now (the adaptive interval)
    preempted: int | None = None  # the preemption signal this step saves on (any rank's)
    lost: str | None = None  # rank 0 lost the run to another process: every rank stops


class StepPolicies:
    """Which triggers fire at a step, and whether the step starts a metric spike."""

    def __init__(self, options: ManagerOptions, ranks: RankGroup | None = None) -> None:
        self.triggers = TriggerSet(options.triggers)
        self.spikes = SpikeWatch(*options.spike) if options.spike else None
        self.ranks = ranks
        # Every rank reports its own preemption signal at each step (one rank signalled is
        # enough for all to save there); without watched signals rank 0 only broadcasts.
        self.share_signals = bool(options.signals)

    def decide(
        self, info: StepInfo, signalled: int | None = None, lost: str | None = None
    ) -> Decision:
        """The triggers due at this step, whether it starts a spike, and what to report.

        In a distributed job rank 0 decides and every rank follows: a ``monitor`` value or a
        clock that differs between ranks must not make them save different steps. A
        preemption signal (``signalled``, on any rank) adds the trigger ``preempted``.
        ``lost`` (rank 0: why its writer lease is gone) reaches every rank the same way, so
        that all of them stop at the same step instead of rank 0 alone.
        """
        ranks = self.ranks
        decision = Decision((), None, {})
        if ranks is None or ranks.is_leader:
            spikes = self.spikes
            spike = spikes.observe(info.metrics.get(spikes.metric)) if spikes else None
            decision = Decision(self.triggers.fired(info), spike, self.triggers.changed_metrics())
        preempted = signalled
        if ranks is not None:
            what = f"deciding step {info.step}"
            mine = [list(decision.fired), lost] if ranks.is_leader else None
            if self.share_signals:
                reports = ranks.all_gather([mine, signalled or 0], group=ranks.control, what=what)
                mine = reports[0][0]
                preempted = next((int(s) for _, s in reports if s), None)
            else:
                mine = ranks.broadcast(mine, group=ranks.control, what=what)
            fired, lost = mine
            decision = Decision(tuple(fired), decision.spike, decision.reports)
        if lost is not None:
            return Decision((), None, {}, None, lost)
        if preempted is None:
            return decision
        fired = decision.fired + (() if PREEMPTED in decision.fired else (PREEMPTED,))
        return Decision(fired, decision.spike, decision.reports, preempted)

    def saved(self, cost_s: float) -> None:
        """A save cost training ``cost_s`` seconds."""
        self.triggers.observe_save(cost_s)

    def params(self) -> dict[str, str]:
        return self.triggers.params()

    @property
    def best_value(self) -> float | None:
        return self.triggers.best_value

    def state_dict(self) -> dict[str, Any]:
        return {
            "triggers": self.triggers.state_dict(),
            "spike": self.spikes.state_dict() if self.spikes else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.triggers.load_state_dict(dict(state.get("triggers") or {}))
        if self.spikes is not None:
            self.spikes.load_state_dict(dict(state.get("spike") or {}))

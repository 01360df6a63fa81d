"""When to save: small, composable trigger objects (as in Orbax's save policies).

Each trigger answers one question for a finished step: "is a checkpoint due?". The manager
asks all of them and, if any says yes, saves once with all their names (a step is saved at
most once). Triggers that keep state (the best value so far, the time of the last save)
expose it through ``state_dict``/``load_state_dict`` so it survives a resume.

A user's own trigger needs only a ``name`` and ``fires(info)``; ``observe``, ``state_dict``
and ``load_state_dict`` are optional (see :class:`Trigger`). Pass it as
``CheckpointManager(..., triggers=[MyTrigger()])``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

INTERVAL_PARAM = "mlflow_ckpt.save_interval_s"


@dataclass(frozen=True)
class StepInfo:
    """What the manager knows about a finished step."""

    step: int
    epoch: int | None
    metrics: dict[str, float]
    end_of_epoch: bool
    now: float
    last_save_time: float


class Trigger(Protocol):
    """A save policy. ``name`` is recorded in the checkpoint's ``mlflow_ckpt.trigger`` tag.

    ``fires(info)`` answers for one finished step. Optional methods, called when present:
    ``observe(info)`` after every step (to update what the trigger remembers), and
    ``state_dict()``/``load_state_dict(state)`` (JSON-able) to carry that across a resume.
    """

    name: str

    def fires(self, info: StepInfo) -> bool: ...


def observe(trigger: Trigger, info: StepInfo) -> None:
    """Let ``trigger`` see a finished step (a no-op for triggers without ``observe``)."""
    method = getattr(trigger, "observe", None)
    if callable(method):
        method(info)


def trigger_state(trigger: Trigger) -> dict[str, Any]:
    """What ``trigger`` needs to survive a resume (``{}`` for stateless triggers)."""
    method: Callable[[], Mapping[str, Any]] | None = getattr(trigger, "state_dict", None)
    return dict(method()) if callable(method) else {}


def load_trigger_state(trigger: Trigger, state: dict[str, Any]) -> None:
    """Give ``trigger`` back what :func:`trigger_state` saved."""
    method = getattr(trigger, "load_state_dict", None)
    if callable(method):
        method(state)


class _Stateless:
    def observe(self, info: StepInfo) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


@dataclass
class EveryNSteps(_Stateless):
    """Save after every ``n`` completed steps: steps ``n-1, 2n-1, ...`` (0-based)."""

    n: int
    name: str = "periodic"

    def fires(self, info: StepInfo) -> bool:
        return (info.step + 1) % self.n == 0


@dataclass
class EveryNEpochs(_Stateless):
    """Save at the end of every ``n``-th epoch (0-based epochs ``n-1, 2n-1, ...``)."""

    n: int
    name: str = "epoch"

    def fires(self, info: StepInfo) -> bool:
        return info.end_of_epoch and info.epoch is not None and (info.epoch + 1) % self.n == 0


@dataclass
class EveryNSeconds(_Stateless):
    """Save when ``seconds`` of wall-clock time have passed since the last save."""

    seconds: float
    name: str = "time"

    def fires(self, info: StepInfo) -> bool:
        return info.now - info.last_save_time >= self.seconds


@dataclass
class YoungDalyInterval:
    """Save every sqrt(2 * C * MTBF) seconds: the Young-Daly optimum for a mean time between
    failures ``mtbf_hours`` and a save cost C, the time training waits for one save (the
    snapshot for async saves, the whole save for sync ones), re-estimated from every save.

    Saving more often than that wastes more time on saves than it saves on recomputation
    after a failure; less often, the other way round. Until the first save is measured, C is
    ``initial_cost_s``. ``save_every_n_seconds="auto", mtbf_hours=...`` builds this trigger.
    """

    mtbf_hours: float
    name: str = "time"
    initial_cost_s: float = 1.0
    cost_s: float | None = None
    reported_s: float | None = field(default=None, repr=False)

    @property
    def interval_s(self) -> float:
        cost = self.initial_cost_s if self.cost_s is None else self.cost_s
        return math.sqrt(2.0 * cost * self.mtbf_hours * 3600.0)

    def fires(self, info: StepInfo) -> bool:
        return info.now - info.last_save_time >= self.interval_s

    def observe_save(self, cost_s: float) -> None:
        """A save just cost training ``cost_s`` seconds (a moving average smooths the noise)."""
        self.cost_s = cost_s if self.cost_s is None else 0.5 * self.cost_s + 0.5 * cost_s

    def params(self) -> dict[str, str]:
        """Logged to the run once, at the start: the interval chosen then."""
        return {INTERVAL_PARAM: f"{self.interval_s:.6g}"}

    def changed_metrics(self) -> dict[str, float]:
        """The interval as a metric, whenever it moved by more than 5% since last reported."""
        now = self.interval_s
        if self.reported_s is not None and abs(now - self.reported_s) <= 0.05 * self.reported_s:
            return {}
        self.reported_s = now
        return {INTERVAL_PARAM: now}

    def state_dict(self) -> dict[str, Any]:
        return {"cost_s": self.cost_s}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cost_s = state.get("cost_s")


@dataclass
class BestMetric:
    """Save whenever ``monitor`` improves on its best value so far (``mode`` min or max).

    Steps without the metric, or with a NaN/infinite value, never fire.
    """

    monitor: str
    mode: str = "min"
    name: str = "best"
    best: float | None = field(default=None)
    best_step: int | None = field(default=None)

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', not {self.mode!r}")

    def _improves(self, value: float | None) -> bool:
        if value is None or not math.isfinite(value):
            return False
        if self.best is None:
            return True
        return value < self.best if self.mode == "min" else value > self.best

    def fires(self, info: StepInfo) -> bool:
        return self._improves(info.metrics.get(self.monitor))

    def observe(self, info: StepInfo) -> None:
        value = info.metrics.get(self.monitor)
        if self._improves(value):
            self.best, self.best_step = value, info.step

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state.get("best")
        self.best_step = state.get("best_step")


class TriggerSet:
    """The triggers of one manager, asked together: a step is saved once, with all names."""

    def __init__(self, triggers: tuple[Trigger, ...]) -> None:
        self.triggers = triggers

    def fired(self, info: StepInfo) -> tuple[str, ...]:
        """The names of the triggers due at this step; then every trigger observes it."""
        names = tuple(t.name for t in self.triggers if t.fires(info))
        for trigger in self.triggers:
            observe(trigger, info)
        return names

    def observe_save(self, cost_s: float) -> None:
        """Tell the triggers that measure it what the last save cost training."""
        for trigger in self.triggers:
            method = getattr(trigger, "observe_save", None)
            if callable(method):
                method(cost_s)

    def params(self) -> dict[str, str]:
        """Run params the triggers want logged at the start (the adaptive interval)."""
        return self._merged("params")

    def changed_metrics(self) -> dict[str, float]:
        """Metrics the triggers report when their settings move (the adaptive interval)."""
        return self._merged("changed_metrics")

    def _merged(self, method: str) -> dict[str, Any]:
        """The union of what the triggers that have ``method`` return from it."""
        out: dict[str, Any] = {}
        for trigger in self.triggers:
            found: Callable[[], Mapping[str, Any]] | None = getattr(trigger, method, None)
            out.update(found() if callable(found) else {})
        return out

    def state_dict(self) -> dict[str, dict[str, Any]]:
        return {t.name: trigger_state(t) for t in self.triggers}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        for trigger in self.triggers:
            if trigger.name in saved:
                load_trigger_state(trigger, dict(saved[trigger.name]))

    @property
    def best_value(self) -> float | None:
        """Best value of the monitored metric so far, if a :class:`BestMetric` is among them."""
        for trigger in self.triggers:
            if isinstance(trigger, BestMetric):
                return trigger.best
        return None

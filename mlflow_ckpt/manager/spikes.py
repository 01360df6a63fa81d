"""Keep the point before a loss spike: watch a metric for sudden jumps.

A spike (the metric jumps above ``factor`` times its recent median, or turns NaN/inf) often
precedes divergence; the checkpoint just before it is the one to go back to, so the manager
pins it (``mlflow_ckpt.pinned=pre_spike``) and retention never deletes it. One pin per spike:
the watch stays "in a spike" until the metric is back below the threshold.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SpikeWatch:
    """Recent values of ``metric``; :meth:`observe` says when a new spike starts.

    A NaN/inf value is always a spike. A jump needs ``min_points`` values before it is judged,
    and a positive median (losses): for a metric that can be negative, "``factor`` times the
    median" means nothing, so only NaN/inf fire there.
    """

    metric: str
    factor: float
    window: int = 20
    min_points: int = 5
    history: list[float] = field(default_factory=list)
    in_spike: bool = False

    def observe(self, value: float | None) -> str | None:
        """Record one value; when it starts a spike, say how (for the pin's log line)."""
        if value is None:
            return None
        median = statistics.median(self.history) if len(self.history) >= self.min_points else None
        jump = median is not None and median > 0 and value > self.factor * median
        spiking = not math.isfinite(value) or jump
        starts = spiking and not self.in_spike
        self.in_spike = spiking
        if not spiking and math.isfinite(value):
            self.history = [*self.history, value][-self.window :]
        if not starts:
            return None
        if not jump:
            return f"{self.metric}={value}"
        return f"{self.metric}={value:.4g} > {self.factor:g} x median {median:.4g}"

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "in_spike": self.in_spike}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [float(v) for v in state.get("history", [])][-self.window :]
        self.in_spike = bool(state.get("in_spike", False))

"""The :class:`Checkpoint` record returned by every query."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from mlflow_ckpt.catalog import tags

if TYPE_CHECKING:
    from mlflow.entities import LoggedModel


@dataclass(frozen=True)
class Checkpoint:
    """One committed checkpoint: an MLflow LoggedModel of a run at a training step.

    ``uri`` (``models:/m-...``) is accepted by :func:`mlflow_ckpt.load`,
    :func:`mlflow.pyfunc.load_model` and the ``mlflow-ckpt`` CLI. ``metrics`` are the values
    logged at ``step``.
    """

    model_id: str
    uri: str
    run_id: str
    step: int
    epoch: int | None
    metrics: dict[str, float]
    size_bytes: int
    format: str
    created_at: datetime
    triggers: tuple[str, ...] = ()
    pinned: str | None = None  # why retention keeps it no matter what (e.g. "pre_spike")
    stored_bytes: int = 0  # what it added to the store (size_bytes is the logical size)
    # Incremental checkpoints: the groups of the run's shared area whose bytes it references.
    shared: tuple[str, ...] = ()
    tier: str = "hot"  # "archive": moved to the store's cold class (or recompressed) in place
    artifact_location: str = field(default="", repr=False, compare=False)

    @classmethod
    def from_logged_model(cls, model: LoggedModel) -> Checkpoint:
        """Build the record from a LoggedModel written by mlflow_ckpt."""
        t = model.tags
        step = int(t.get(tags.STEP, "0"))
        latest: dict[str, tuple[int, float]] = {}
        for metric in model.metrics or []:
            if metric.step == step:
                seen = latest.get(metric.key)
                if seen is None or metric.timestamp >= seen[0]:
                    latest[metric.key] = (metric.timestamp, float(metric.value))
        epoch = t.get(tags.EPOCH, "")
        return cls(
            model_id=model.model_id,
            uri=f"models:/{model.model_id}",
            run_id=model.source_run_id or "",
            step=step,
            epoch=int(epoch) if epoch not in ("", "None") else None,
            metrics={k: v for k, (_, v) in sorted(latest.items())},
            size_bytes=int(t.get(tags.SIZE_BYTES, "0") or 0),
            format=t.get(tags.FORMAT, ""),
            created_at=datetime.fromtimestamp(model.creation_timestamp / 1000, tz=timezone.utc),
            triggers=tuple(x for x in t.get(tags.TRIGGER, "").split(",") if x),
            pinned=t.get(tags.PINNED) or None,
            stored_bytes=int(t.get(tags.STORED_BYTES) or t.get(tags.SIZE_BYTES, "0") or 0),
            shared=tuple(g for g in t.get(tags.SHARED, "").split(",") if g),
            tier=t.get(tags.TIER) or tags.HOT,
            artifact_location=model.artifact_location,
        )

    def metric(self, name: str) -> float | None:
        """The value of ``name`` at this checkpoint's step, or ``None`` if absent or not finite."""
        value = self.metrics.get(name)
        if value is None or not math.isfinite(value) or abs(value) >= sys.float_info.max:
            return None  # MLflow's SQL stores keep inf as the largest float
        return value

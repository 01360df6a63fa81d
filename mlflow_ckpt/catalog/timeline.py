"""A picture of a run's checkpoints: the monitored metric against step, one marker per
checkpoint by what became of it.

Everything is read back from MLflow (the run's metric history, its LoggedModel outputs, the
checkpoints' tags), so ``mlflow-ckpt plot`` draws the same picture from any process as the
manager logs at ``close()`` (``mlflow_ckpt/timeline.png``, under the run's Artifacts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from mlflow import MlflowClient

from mlflow_ckpt.catalog import tags
from mlflow_ckpt.catalog.checkpoint import Checkpoint
from mlflow_ckpt.catalog.deletion import is_pinned, is_registered
from mlflow_ckpt.catalog.queries import pick_best, search_models
from mlflow_ckpt.catalog.runs import get_run

# Refused saves log this metric at their step (value 1), so pictures can show them later.
NONFINITE_METRIC = "mlflow_ckpt.nonfinite_skipped"
ARTIFACT_PATH = "mlflow_ckpt"
ARTIFACT_NAME = "timeline.png"

# state -> (marker, color, label), drawn in this order (later ones on top)
STYLES: dict[str, tuple[str, str, str]] = {
    "deleted": ("x", "#9e9e9e", "deleted by retention"),
    "kept": ("o", "#1f77b4", "kept"),
    "pinned": ("^", "#d62728", "pinned"),
    "promoted": ("D", "#2ca02c", "promoted (registry)"),
    "best": ("*", "#ff9f1c", "best"),
    "bad": ("X", "#000000", "corrupt / invalid"),
    "nonfinite": ("v", "#9467bd", "skipped: NaN/inf state"),
}


@dataclass
class Timeline:
    """What the picture shows: the metric's curve and the steps of each kind of checkpoint."""

    run_id: str
    metric: str | None
    run_name: str = ""
    curve: list[tuple[int, float]] = field(default_factory=list)
    steps: dict[str, list[int]] = field(default_factory=lambda: {k: [] for k in STYLES})


def gather(client: MlflowClient, run_id: str, metric: str | None = None) -> Timeline:
    """Read a run's checkpoints and metric history from MLflow."""
    run = get_run(client, run_id)
    metric = metric or run.data.tags.get(tags.RUN_MONITOR)
    mode = run.data.tags.get(tags.RUN_MODE, "min")
    line = Timeline(run_id, metric, run.info.run_name or "")
    if metric:
        history = client.get_metric_history(run_id, metric)
        line.curve = sorted((m.step, m.value) for m in history if math.isfinite(m.value))
    found = search_models(client, [run.info.experiment_id], f"source_run_id = '{run.info.run_id}'")
    committed = [m for m in found if m.tags.get(tags.STATUS) == tags.COMMITTED]
    # the same rule as best_checkpoint, on the models already fetched (no second query)
    best = (
        pick_best([Checkpoint.from_logged_model(m) for m in committed], metric, mode)
        if metric
        else None
    )
    for model in committed:
        step = int(model.tags.get(tags.STEP, "0"))
        line.steps["kept"].append(step)
        if is_pinned(model):
            line.steps["pinned"].append(step)
        if is_registered(model):
            line.steps["promoted"].append(step)
        if best is not None and model.model_id == best.model_id:
            line.steps["best"].append(step)
    bad = (tags.CORRUPT, tags.INVALID)
    line.steps["bad"] = [
        int(m.tags.get(tags.STEP, "0")) for m in found if m.tags.get(tags.STATUS) in bad
    ]
    alive = {m.model_id for m in found}
    outputs = run.outputs.model_outputs if run.outputs else []
    line.steps["deleted"] = [o.step for o in outputs if o.model_id not in alive]
    line.steps["nonfinite"] = [m.step for m in client.get_metric_history(run_id, NONFINITE_METRIC)]
    return line


def render(line: Timeline, path: Path, title: str | None = None) -> Path:
    """Draw ``line`` into a PNG file at ``path``."""
    # A Figure with its own Agg canvas, no pyplot: the user's backend (a notebook's inline
    # one, a GUI) and pyplot's list of open figures stay as they were.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    values = dict(line.curve)
    if line.curve:
        ax.plot(*zip(*line.curve, strict=True), color="#4c72b0", alpha=0.45, lw=1.2)
    floor = min(values.values()) if values else 0.0
    for state, (marker, color, label) in STYLES.items():
        steps = sorted(set(line.steps[state]))
        if not steps:
            continue
        ys = [_value_at(line.curve, s, floor) for s in steps]
        size = 160 if state == "best" else 60
        ax.scatter(steps, ys, marker=marker, c=color, s=size, label=label, zorder=3)
    ax.set_xlabel("step")
    ax.set_ylabel(line.metric or "(no monitored metric)")
    name = f"{line.run_name} ({line.run_id})" if line.run_name else line.run_id
    ax.set_title(title or f"Checkpoints of run {name}")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _value_at(curve: list[tuple[int, float]], step: int, default: float) -> float:
    """The metric at ``step``, or the last value before it (checkpoints between logs)."""
    before = [v for s, v in curve if s <= step]
    if before:
        return before[-1]
    return curve[0][1] if curve else default

"""How the CLI shows things: tables for people, JSON records for scripts, one-line errors."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import click

from mlflow_ckpt.catalog import Checkpoint
from mlflow_ckpt.errors import CheckpointError

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def record(ckpt: Checkpoint) -> dict[str, Any]:
    data = asdict(ckpt)
    data["created_at"] = ckpt.created_at.isoformat()
    data["triggers"] = list(ckpt.triggers)
    return data


def size_text(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}GB"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def metrics_text(ckpt: Checkpoint) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in ckpt.metrics.items())


def checkpoint_rows(ckpts: Sequence[Checkpoint]) -> list[list[Any]]:
    return [
        [
            c.step,
            c.epoch,
            ",".join(c.triggers),
            metrics_text(c),
            size_text(c.size_bytes),
            size_text(c.stored_bytes),
            c.tier,
            c.pinned or "",
            c.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            c.uri,
        ]
        for c in ckpts
    ]


HEADERS = [
    "step",
    "epoch",
    "trigger",
    "metrics",
    "size",
    "stored",
    "tier",
    "pinned",
    "created (UTC)",
    "uri",
]


@contextmanager
def errors() -> Iterator[None]:
    """Our errors become a one-line message and exit status 1, not a traceback."""
    try:
        yield
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc


def progress_bar(total: int, label: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=label,
        unit="B",
        unit_scale=True,
        disable=not (enabled and sys.stderr.isatty()),
        leave=False,
    )

"""Looking at checkpoints: ``list``, ``show``, ``verify``, ``diff``."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import click
from mlflow import MlflowClient

from mlflow_ckpt.catalog import (
    Checkpoint,
    describe,
    diff_checkpoints,
    list_checkpoints,
    resolve,
    tags,
    timeline,
)
from mlflow_ckpt.catalog.reader import read_checkpoint, verify_checkpoint
from mlflow_ckpt.cli.group import main
from mlflow_ckpt.cli.output import (
    HEADERS,
    RUN_ID,
    checkpoint_rows,
    errors,
    progress_bar,
    record,
    size_text,
    table,
)


@main.command("list")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON records.")
def list_cmd(run_id: str, as_json: bool) -> None:
    """List the committed checkpoints of RUN_ID, newest step first."""
    with errors():
        ckpts = list_checkpoints(run_id)
    if as_json:
        click.echo(json.dumps([record(c) for c in ckpts], indent=1))
    elif not ckpts:
        click.echo(f"run {run_id} has no committed checkpoints")
    else:
        click.echo(table(HEADERS, checkpoint_rows(ckpts)))


@main.command()
@click.argument("uri")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show(uri: str, as_json: bool) -> None:
    """Show one checkpoint: its record, files, tensors and versions."""
    with errors():
        model = resolve(uri, MlflowClient())
        manifest = read_checkpoint(model).manifest
    ckpt = Checkpoint.from_logged_model(model)
    if as_json:
        data = record(ckpt)
        data["files"] = [asdict(f) for f in manifest.files]
        data["tensors"] = len(manifest.tensors)
        data["versions"] = manifest.versions
        click.echo(json.dumps(data, indent=1))
        return
    for key, value in record(ckpt).items():
        click.echo(f"{key:>18}: {value}")
    click.echo(f"{'tensors':>18}: {len(manifest.tensors)}")
    click.echo(f"{'written by':>18}: {manifest.versions}")
    click.echo(
        table(
            ["file", "size", "hash"],
            [[f.path, size_text(f.size), f"{f.algorithm}:{f.digest[:16]}"] for f in manifest.files],
        )
    )


@main.command()
@click.argument("target")
@click.option("--progress/--no-progress", default=True, help="Progress bar on a terminal.")
def verify(target: str, progress: bool) -> None:
    """Re-hash every file of a checkpoint (URI) or of all checkpoints of a run (RUN_ID).

    Exits 1 and names each bad file when anything is corrupt.
    """
    client = MlflowClient()
    with errors():
        if RUN_ID.match(target):
            models = [resolve(c, client) for c in list_checkpoints(target, client=client)]
        else:
            models = [resolve(target, client)]
    bad = 0
    for model in models:
        total = int(model.tags.get(tags.SIZE_BYTES, "0") or 0)
        with progress_bar(total, model.model_id, progress) as bar:
            problems = verify_checkpoint(model, on_file=lambda f, bar=bar: bar.update(f.size))
        if problems:
            bad += 1
            for problem in problems:
                click.echo(f"CORRUPT {describe(model)}: {problem.path}: {problem}")
        else:
            click.echo(f"ok      {describe(model)}")
    if bad:
        click.echo(f"{bad} of {len(models)} checkpoint(s) corrupt", err=True)
        sys.exit(1)
    click.echo(f"all {len(models)} checkpoint(s) verified")


@main.command()
@click.argument("uri_a")
@click.argument("uri_b")
@click.option("--all", "show_all", is_flag=True, help="Also list unchanged tensors.")
@click.option("--json", "as_json", is_flag=True)
def diff(uri_a: str, uri_b: str, show_all: bool, as_json: bool) -> None:
    """Compare two checkpoints tensor by tensor: changed or not, max abs difference."""
    with errors():
        rows = diff_checkpoints(uri_a, uri_b)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    shown = [r for r in rows if show_all or r["status"] != "same"]
    click.echo(
        table(
            ["tensor", "status", "max abs diff"],
            [
                [
                    r["name"],
                    r["status"],
                    "" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.3g}",
                ]
                for r in shown
            ],
        )
    )
    same = sum(r["status"] == "same" for r in rows)
    click.echo(f"{len(rows)} tensors: {same} same, {len(rows) - same} different")


@main.command()
@click.argument("run_id")
@click.option("-o", "--output", "output", help="PNG file (default: RUN_ID-timeline.png here).")
@click.option("--metric", help="Metric to draw (default: the run's monitored metric).")
def plot(run_id: str, output: str | None, metric: str | None) -> None:
    """Draw RUN_ID's checkpoints on its metric: kept, deleted, best, promoted, pinned, bad."""
    with errors():
        line = timeline.gather(MlflowClient(), run_id, metric)
    path = timeline.render(line, Path(output or f"{run_id}-timeline.png"))
    counts = ", ".join(f"{len(set(v))} {k}" for k, v in line.steps.items() if v)
    click.echo(f"wrote {path} ({counts or 'no checkpoints'})")

"""``mlflow-ckpt``: list, inspect, verify, clean up, promote and export checkpoints.

Every command talks to the tracking store named by ``--tracking-uri`` or
``MLFLOW_TRACKING_URI`` (MLflow's own default otherwise). Tables are for people, ``--json``
for scripts; progress bars appear on long transfers when stderr is a terminal.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import click
import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run

from mlflow_ckpt.catalog import (
    Checkpoint,
    best_checkpoint,
    describe,
    diff_checkpoints,
    export_onnx,
    export_safetensors,
    list_checkpoints,
    promote,
    resolve,
    tags,
)
from mlflow_ckpt.catalog.reader import read_checkpoint, verify_checkpoint
from mlflow_ckpt.catalog.runs import get_run
from mlflow_ckpt.errors import CheckpointError, WriterConflictError
from mlflow_ckpt.manager.ownership import take_run
from mlflow_ckpt.manager.retention import apply_retention, build_policy

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def _record(ckpt: Checkpoint) -> dict[str, Any]:
    data = asdict(ckpt)
    data["created_at"] = ckpt.created_at.isoformat()
    data["triggers"] = list(ckpt.triggers)
    return data


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}GB"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def _metrics(ckpt: Checkpoint) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in ckpt.metrics.items())


def _checkpoint_rows(ckpts: Sequence[Checkpoint]) -> list[list[Any]]:
    return [
        [
            c.step,
            c.epoch,
            ",".join(c.triggers),
            _metrics(c),
            _size(c.size_bytes),
            c.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            c.uri,
        ]
        for c in ckpts
    ]


_HEADERS = ["step", "epoch", "trigger", "metrics", "size", "created (UTC)", "uri"]


@contextmanager
def _errors() -> Iterator[None]:
    """Our errors become a one-line message and exit status 2, not a traceback."""
    try:
        yield
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc


def _progress(total: int, label: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=label,
        unit="B",
        unit_scale=True,
        disable=not (enabled and sys.stderr.isatty()),
        leave=False,
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--tracking-uri",
    envvar="MLFLOW_TRACKING_URI",
    default=None,
    help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else MLflow's default).",
)
def main(tracking_uri: str | None) -> None:
    """Training checkpoints stored as MLflow LoggedModels."""
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)


@main.command("list")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON records.")
def list_cmd(run_id: str, as_json: bool) -> None:
    """List the committed checkpoints of RUN_ID, newest step first."""
    with _errors():
        ckpts = list_checkpoints(run_id)
    if as_json:
        click.echo(json.dumps([_record(c) for c in ckpts], indent=1))
    elif not ckpts:
        click.echo(f"run {run_id} has no committed checkpoints")
    else:
        click.echo(_table(_HEADERS, _checkpoint_rows(ckpts)))


@main.command()
@click.argument("uri")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show(uri: str, as_json: bool) -> None:
    """Show one checkpoint: its record, files, tensors and versions."""
    with _errors():
        model = resolve(uri, MlflowClient())
        manifest = read_checkpoint(model).manifest
    ckpt = Checkpoint.from_logged_model(model)
    if as_json:
        data = _record(ckpt)
        data["files"] = [asdict(f) for f in manifest.files]
        data["tensors"] = len(manifest.tensors)
        data["versions"] = manifest.versions
        click.echo(json.dumps(data, indent=1))
        return
    for key, value in _record(ckpt).items():
        click.echo(f"{key:>18}: {value}")
    click.echo(f"{'tensors':>18}: {len(manifest.tensors)}")
    click.echo(f"{'written by':>18}: {manifest.versions}")
    click.echo(
        _table(
            ["file", "size", "sha256"],
            [[f.path, _size(f.size), f.sha256[:16]] for f in manifest.files],
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
    with _errors():
        if _RUN_ID.match(target):
            models = [resolve(c, client) for c in list_checkpoints(target, client=client)]
        else:
            models = [resolve(target, client)]
    bad = 0
    for model in models:
        total = int(model.tags.get(tags.SIZE_BYTES, "0") or 0)
        with _progress(total, model.model_id, progress) as bar:
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
@click.argument("run_id")
@click.option("--keep-last", type=click.IntRange(min=1), help="Keep the N newest.")
@click.option("--keep-best", type=click.IntRange(min=1), help="Keep the N best by --metric.")
@click.option("--keep-every", type=click.IntRange(min=1), help="Keep steps N-1, 2N-1, ...")
@click.option("--metric", help="Metric for --keep-best (value at each checkpoint's step).")
@click.option("--mode", type=click.Choice(["min", "max"]), default="min", show_default=True)
@click.option("--dry-run", is_flag=True, help="Only print what would be deleted.")
@click.option(
    "--force",
    is_flag=True,
    help="Take the run's writer lease from a live process to clean up (that writer stops).",
)
def gc(
    run_id: str,
    keep_last: int | None,
    keep_best: int | None,
    keep_every: int | None,
    metric: str | None,
    mode: str,
    dry_run: bool,
    force: bool,
) -> None:
    """Clean up RUN_ID: interrupted saves, then checkpoints no --keep-* rule keeps.

    Saves cut short by a crash are adopted when complete; failed and incomplete ones are
    removed (leftover files, then their LoggedModel), as the run's writer (a live one is left
    alone unless --force takes the run over). The newest checkpoint and checkpoints used by
    registered model versions are always kept.
    """
    try:
        policy = build_policy(
            keep_last_n=keep_last,
            keep_best_n=keep_best,
            keep_every_n_steps=keep_every,
            metric=metric,
            mode=mode,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc).replace("monitor=", "--metric")) from exc
    client = MlflowClient()
    with _errors():
        run = get_run(client, run_id)
        _clean_interrupted(client, run, force=force, dry_run=dry_run)
        if policy is None:
            return
        result = apply_retention(client, run_id, policy, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    for ckpt in result.deleted:
        click.echo(f"{verb:>12} step {ckpt.step:<8} {ckpt.uri}")
    for ckpt in result.protected:
        click.echo(f"{'registered':>12} step {ckpt.step:<8} {ckpt.uri} (kept)")
    click.echo(f"kept {len(result.kept) + len(result.protected)}, {verb} {len(result.deleted)}")


def _clean_interrupted(client: MlflowClient, run: Run, *, force: bool, dry_run: bool) -> None:
    if dry_run:
        return
    # Clean up as the run's writer: no save can start (or be adopted twice) meanwhile.
    try:
        claim = take_run(client, run, force=force, sweep=True)
    except WriterConflictError as exc:
        click.echo(f"{exc} Its in-flight saves are left alone.")
        return
    claim.release()
    click.echo(
        f"interrupted saves: {len(claim.adopted)} adopted, {len(claim.swept)} failed save(s) "
        "removed"
    )


@main.command()
@click.option(
    "--experiment",
    "experiments",
    multiple=True,
    required=True,
    help="Experiment name (repeatable).",
)
@click.option("--metric", required=True)
@click.option("--mode", type=click.Choice(["min", "max"]), default="min", show_default=True)
@click.option("--filter", "filter_string", help="Extra MLflow filter over LoggedModels.")
@click.option("--run-filter", help="MLflow run filter, e.g. \"params.lr = '0.01'\".")
@click.option("--json", "as_json", is_flag=True)
def best(
    experiments: tuple[str, ...],
    metric: str,
    mode: str,
    filter_string: str | None,
    run_filter: str | None,
    as_json: bool,
) -> None:
    """The best committed checkpoint across the runs of the given experiments."""
    ids = []
    for name in experiments:
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            raise click.ClickException(f"no experiment named {name!r}")
        ids.append(exp.experiment_id)
    with _errors():
        ckpt = best_checkpoint(
            experiment_ids=ids,
            metric=metric,
            mode=mode,
            filter_string=filter_string,
            run_filter=run_filter,
        )
    if ckpt is None:
        raise click.ClickException(f"no committed checkpoint has a finite {metric!r}")
    if as_json:
        click.echo(json.dumps(_record(ckpt), indent=1))
    else:
        click.echo(_table([*_HEADERS, "run"], [[*_checkpoint_rows([ckpt])[0], ckpt.run_id]]))


@main.command("promote")
@click.argument("uri")
@click.option("--name", required=True, help="Registered model name.")
@click.option("--alias", default="champion", show_default=True)
@click.option("--tag", "tags", multiple=True, help="KEY=VALUE tag of the model version.")
def promote_cmd(uri: str, name: str, alias: str, tags: tuple[str, ...]) -> None:
    """Register checkpoint URI as a new version of NAME and point ALIAS at it."""
    pairs = dict(t.split("=", 1) for t in tags if "=" in t)
    with _errors():
        version = promote(uri, name, alias=alias, tags=pairs)
    click.echo(
        f"registered {name} version {version.version} (alias {alias}): models:/{name}@{alias}"
    )


@main.command()
@click.argument("uri")
@click.option("--format", "fmt", type=click.Choice(["onnx", "safetensors"]), required=True)
@click.option(
    "-o", "--output", "output", help="Output file (ONNX default: next to the checkpoint)."
)
@click.option(
    "--example-shape", default=None, help="ONNX: shape of a float32 example input, e.g. 1,20."
)
def export(uri: str, fmt: str, output: str | None, example_shape: str | None) -> None:
    """Export a checkpoint's model as ONNX (verified) or one standard safetensors file."""
    import torch

    with _errors():
        if fmt == "safetensors":
            if not output:
                raise click.UsageError("--format safetensors needs -o PATH")
            where = export_safetensors(uri, output)
        else:
            if not example_shape:
                raise click.UsageError("--format onnx needs --example-shape (e.g. 1,20)")
            shape = [int(d) for d in example_shape.split(",")]
            where = export_onnx(uri, torch.randn(*shape), output)
    click.echo(f"wrote {where}")


@main.command()
@click.argument("uri_a")
@click.argument("uri_b")
@click.option("--all", "show_all", is_flag=True, help="Also list unchanged tensors.")
@click.option("--json", "as_json", is_flag=True)
def diff(uri_a: str, uri_b: str, show_all: bool, as_json: bool) -> None:
    """Compare two checkpoints tensor by tensor: changed or not, max abs difference."""
    with _errors():
        rows = diff_checkpoints(uri_a, uri_b)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    shown = [r for r in rows if show_all or r["status"] != "same"]
    click.echo(
        _table(
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


if __name__ == "__main__":  # pragma: no cover
    main()

"""``mlflow-ckpt evaluate``: score kept checkpoints with a function of your own code.

For a benchmark run from a shell or a CI job after training; the function is the same one
:func:`mlflow_ckpt.evaluate` takes, named by its import path.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

import click

from mlflow_ckpt.after_training.evaluation import EvaluationResult, evaluate
from mlflow_ckpt.cli.group import main
from mlflow_ckpt.cli.output import RUN_ID, errors, table
from mlflow_ckpt.errors import CheckpointError


@main.command("evaluate")
@click.argument("targets", nargs=-1, required=True)
@click.option(
    "--fn",
    "fn_path",
    required=True,
    help="'package.module:function' taking the model, returning {metric: number}; "
    "the current folder is importable.",
)
@click.option("--prefix", "metric_prefix", default="", help="Prefix of every metric name.")
@click.option("--name", default=None, help="The evaluation's identity (default: prefix + fn).")
@click.option("--overwrite", is_flag=True, help="Evaluate checkpoints already evaluated again.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON records.")
@click.option("--progress/--no-progress", default=True, help="Progress bar on a terminal.")
def evaluate_cmd(
    targets: tuple[str, ...],
    fn_path: str,
    metric_prefix: str,
    name: str | None,
    overwrite: bool,
    as_json: bool,
    progress: bool,
) -> None:
    """Score every checkpoint of RUN_ID (or the checkpoint URIs given) with --fn.

    Each metric is logged at the checkpoint's step to its run, linked to the checkpoint, so
    the Models tab shows it and `best --metric` ranks by it. Checkpoints this evaluation
    already scored are skipped. Exits 1, naming each, when some could not be scored.
    """
    with errors():
        fn = import_function(fn_path)
        run_or_refs = targets[0] if len(targets) == 1 and RUN_ID.match(targets[0]) else targets
        try:
            result = evaluate(
                run_or_refs,
                fn,
                metric_prefix=metric_prefix,
                name=name,
                overwrite=overwrite,
                raise_on_failure=False,
                progress=None if progress else False,
            )
        except ValueError as exc:  # a name evaluate() refuses: a usage error
            raise click.UsageError(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(records(result), indent=1))
    else:
        click.echo(table(["step", "status", "metrics", "uri"], rows(result)))
    for outcome in result.failed:
        click.echo(f"FAILED {outcome.uri}: {outcome.error}", err=True)
    if result.failed:
        sys.exit(1)


def import_function(path: str) -> Any:
    """Import ``"package.module:function"`` from the user's code (the current folder first,
    as ``python -m`` would)."""
    module_name, _, qualname = path.partition(":")
    if not module_name or not qualname:
        raise click.BadParameter(f"{path!r}: use 'package.module:function'", param_hint="--fn")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise CheckpointError(f"Cannot import the evaluation function {path!r}: {exc}") from exc
    if not callable(obj):
        raise click.BadParameter(f"{path!r} is a {type(obj).__name__}", param_hint="--fn")
    return obj


def rows(result: EvaluationResult) -> list[list[Any]]:
    return [
        [
            c.checkpoint.step if c.checkpoint else "",
            c.status,
            " ".join(f"{k}={v:.4g}" for k, v in sorted(c.metrics.items())),
            c.uri,
        ]
        for c in result.checkpoints
    ]


def records(result: EvaluationResult) -> list[dict[str, Any]]:
    return [
        {
            "uri": c.uri,
            "run_id": c.checkpoint.run_id if c.checkpoint else None,
            "step": c.checkpoint.step if c.checkpoint else None,
            "status": c.status,
            "metrics": c.metrics,
            "error": None if c.error is None else f"{type(c.error).__name__}: {c.error}",
        }
        for c in result.checkpoints
    ]

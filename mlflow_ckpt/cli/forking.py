"""``mlflow-ckpt fork``: branch a new run off a checkpoint, for any training script to go on.

The command makes the run (history copied, nested under the source) and prints its ID; the
training command that continues it is the user's own: ``CheckpointManager.resume(run_id,
state)`` restores the checkpoint the fork branched off, in one process or on every rank of
a distributed job. :func:`mlflow_ckpt.fork` does both steps in one process.
"""

from __future__ import annotations

import json

import click
from mlflow import MlflowClient

from mlflow_ckpt.catalog.lineage import create_fork
from mlflow_ckpt.cli.group import main
from mlflow_ckpt.cli.output import errors


def _param(value: str) -> tuple[str, str]:
    key, sep, text = value.partition("=")
    if not sep or not key:
        raise click.BadParameter(f"expected KEY=VALUE, got {value!r}")
    return key, text


@main.command("fork")
@click.argument("uri")
@click.option("--run-name", help="Name of the new run (default: <source run>-fork-<step>).")
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="A param that differs in the fork (repeatable), e.g. --param lr=1e-4.",
)
@click.option("--json", "as_json", is_flag=True)
def fork_command(uri: str, run_name: str | None, params: tuple[str, ...], as_json: bool) -> None:
    """A new run branching off checkpoint URI: the source's params, tags and metric
    history up to its step, nested under the source run; the source is only read."""
    overrides = dict(_param(p) for p in params)
    with errors():
        made = create_fork(MlflowClient(), uri, run_name=run_name, params=overrides)
    info = made.run.info
    if as_json:
        record = {
            "run_id": info.run_id,
            "run_name": info.run_name,
            "experiment_id": info.experiment_id,
            "source_run_id": made.source.run_id,
            "source_checkpoint": made.source.uri,
            "step": made.source.step,
            "metric_points": made.metric_points,
            "params": made.params,
        }
        click.echo(json.dumps(record, indent=1))
        return
    click.echo(
        f"Forked run {made.source.run_id} at step {made.source.step} ({made.source.uri}) "
        f"into run {info.run_id} ({info.run_name}, experiment {info.experiment_id}): "
        f"{made.params} params and {made.metric_points} metric points copied."
    )
    click.echo(
        "Continue training it from step "
        f"{made.source.step + 1}: CheckpointManager.resume({info.run_id!r}, state)"
    )

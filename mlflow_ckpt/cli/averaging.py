"""``mlflow-ckpt average``: the (weighted) mean of checkpoints, logged as a new checkpoint."""

from __future__ import annotations

import json

import click
from mlflow import MlflowClient

from mlflow_ckpt.after_training.averaging import average
from mlflow_ckpt.catalog import Checkpoint, list_checkpoints
from mlflow_ckpt.cli.group import main
from mlflow_ckpt.cli.output import HEADERS, RUN_ID, checkpoint_rows, errors, record, table


def _weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError as exc:
        raise click.BadParameter(
            f"{text!r} is not a comma-separated list of numbers", param_hint="--weights"
        ) from exc


def _sources(refs: tuple[str, ...], last: int | None, client: MlflowClient) -> list[str]:
    """The URIs to average: the ``last`` newest checkpoints of the one run ID given, or the
    URIs themselves."""
    if last is None:
        if len(refs) < 2:
            raise click.UsageError("give two or more checkpoint URIs, or RUN_ID --last N")
        return list(refs)
    if len(refs) != 1 or not RUN_ID.match(refs[0]):
        raise click.UsageError("--last N takes exactly one RUN_ID (32 hex digits)")
    ckpts = list_checkpoints(refs[0], client=client)[:last]
    if len(ckpts) < last:
        raise click.ClickException(
            f"run {refs[0]} has {len(ckpts)} committed checkpoint(s), fewer than --last {last}"
        )
    return [c.uri for c in ckpts]


@main.command("average")
@click.argument("refs", nargs=-1, required=True, metavar="RUN_ID --last N | URI URI...")
@click.option(
    "--last", type=click.IntRange(min=2), help="Average the N newest checkpoints of RUN_ID."
)
@click.option(
    "--weights", help="Comma-separated weights, one per checkpoint (newest first with --last)."
)
@click.option("--run-id", "run_id", help="Log the average in this run (default: the newest's).")
@click.option("--json", "as_json", is_flag=True)
def average_command(
    refs: tuple[str, ...],
    last: int | None,
    weights: str | None,
    run_id: str | None,
    as_json: bool,
) -> None:
    """Average checkpoints' model weights into a new checkpoint and print it.

    `mlflow-ckpt average RUN_ID --last 5` averages a run's 5 newest checkpoints;
    `mlflow-ckpt average URI URI ...` the checkpoints named. The average is logged in the
    newest source's run (or --run-id), is loadable, servable and promotable like any
    checkpoint, and is never listed, resumed from or deleted by the run's retention.
    """
    client = MlflowClient()
    parsed = _weights(weights)
    with errors():
        uris = _sources(refs, last, client)
        try:
            ckpt: Checkpoint = average(uris, weights=parsed, run_id=run_id, client=client)
        except ValueError as exc:  # weights that do not fit: a usage error, not a traceback
            raise click.UsageError(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(record(ckpt), indent=1))
    else:
        click.echo(table([*HEADERS, "run"], [[*checkpoint_rows([ckpt])[0], ckpt.run_id]]))

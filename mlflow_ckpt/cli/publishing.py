"""Getting checkpoints out: ``best``, ``promote``, ``export``."""

from __future__ import annotations

import json

import click
import mlflow

from mlflow_ckpt.catalog import best_checkpoint, export_onnx, export_safetensors, promote
from mlflow_ckpt.cli.group import main
from mlflow_ckpt.cli.output import HEADERS, checkpoint_rows, errors, record, table


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
    with errors():
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
        click.echo(json.dumps(record(ckpt), indent=1))
    else:
        click.echo(table([*HEADERS, "run"], [[*checkpoint_rows([ckpt])[0], ckpt.run_id]]))


@main.command("promote")
@click.argument("uri")
@click.option("--name", required=True, help="Registered model name.")
@click.option("--alias", default="champion", show_default=True)
@click.option("--tag", "tags", multiple=True, help="KEY=VALUE tag of the model version.")
def promote_cmd(uri: str, name: str, alias: str, tags: tuple[str, ...]) -> None:
    """Register checkpoint URI as a new version of NAME and point ALIAS at it."""
    pairs = dict(t.split("=", 1) for t in tags if "=" in t)
    with errors():
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

    with errors():
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

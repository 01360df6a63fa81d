"""The ``mlflow-ckpt`` command group; the commands register themselves on it."""

from __future__ import annotations

import click
import mlflow


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

"""The cold tier: ``archive`` and ``unarchive`` (see :mod:`mlflow_ckpt.catalog.archive`)."""

from __future__ import annotations

import click
from mlflow import MlflowClient

from mlflow_ckpt.catalog import describe, resolve, tags
from mlflow_ckpt.catalog.archive import (
    DEFAULT_ARCHIVE_LEVEL,
    archive_checkpoint,
    unarchive_checkpoint,
)
from mlflow_ckpt.cli.group import main
from mlflow_ckpt.cli.output import errors


@main.command()
@click.argument("uri")
@click.option(
    "--storage-class",
    help="S3 storage class (default GLACIER_IR; STANDARD_IA...), Azure tier (default Cool; "
    "Cold) or GCS class (default COLDLINE).",
)
@click.option(
    "--level",
    type=click.IntRange(1, 22),
    default=DEFAULT_ARCHIVE_LEVEL,
    show_default=True,
    help="zstd level where the store has no classes (local, mlflow server).",
)
def archive(uri: str, storage_class: str | None, level: int) -> None:
    """Move checkpoint URI to the store's cold tier in place (it stays loadable)."""
    client = MlflowClient()
    with errors():
        model = resolve(uri, client)
        if model.tags.get(tags.TIER) == tags.ARCHIVE:
            click.echo(f"{describe(model)} is already archived")
            return
        how = archive_checkpoint(uri, storage_class=storage_class, level=level, client=client)
    click.echo(f"archived {describe(model)} ({how})")


@main.command()
@click.argument("uri")
def unarchive(uri: str) -> None:
    """Bring archived checkpoint URI back to the hot tier."""
    client = MlflowClient()
    with errors():
        model = resolve(uri, client)
        if model.tags.get(tags.TIER) != tags.ARCHIVE:
            click.echo(f"{describe(model)} is not archived")
            return
        unarchive_checkpoint(uri, client=client)
    click.echo(f"unarchived {describe(model)}")

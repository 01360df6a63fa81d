"""Catalog records written straight through the catalog layer, for scale tests and benchmarks.

Creating thousands of checkpoints through real saves would take most of a CI run; a record
made of ``create_pending`` + ``commit`` is exactly what a save leaves in the tracking store
(its files do not matter to the queries that read it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import mlflow
import pytest
from mlflow import MlflowClient

from mlflow_ckpt.catalog import models


def committed_record(
    client: MlflowClient,
    experiment_id: str,
    run_id: str,
    step: int,
    *,
    loss: float,
    timestamp_ms: int = 1,
    size_bytes: int = 1,
) -> None:
    """A committed checkpoint record at ``step`` with ``loss`` linked, as a save leaves it."""
    model = models.create_pending(
        client,
        experiment_id=experiment_id,
        run_id=run_id,
        step=step,
        epoch=None,
        triggers=("periodic",),
        format="safetensors",
    )
    models.commit(
        client,
        model,
        run_id=run_id,
        step=step,
        metrics={"loss": loss},
        timestamp_ms=timestamp_ms,
        size_bytes=size_bytes,
        manifest_sha256="0" * 64,
    )


@contextlib.contextmanager
def tracking_at(url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make ``url`` the tracking URI (environment and ``mlflow``) for the block."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    mlflow.set_tracking_uri(url)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)

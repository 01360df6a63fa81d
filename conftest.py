"""Shared pytest fixtures: a real MLflow tracking store (sqlite) and local artifact store per test.

Creating a fresh sqlite database runs MLflow's migrations (seconds), so one template database
is built per session and copied for each test.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")


@pytest.fixture(scope="session")
def _template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    folder = tmp_path_factory.mktemp("template")
    db = folder / "mlflow.db"
    SqlAlchemyStore(f"sqlite:///{db}", str(folder / "mlruns"))
    return db


@pytest.fixture
def tracking(tmp_path: Path, _template_db: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh MLflow tracking store in ``tmp_path``; the current experiment stores there too."""
    import mlflow

    db = tmp_path / "mlflow.db"
    shutil.copy(_template_db, db)
    uri = f"sqlite:///{db}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("tests")
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)

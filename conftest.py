"""Shared pytest fixtures: a real MLflow tracking store (sqlite) and local artifact store per test.

Creating a fresh sqlite database runs MLflow's migrations (seconds), so one template database
is built per session and copied for each test.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
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


def fresh_store(template_db: Path, folder: Path) -> str:
    """A new sqlite tracking store in ``folder`` (a copy of the template): its URI."""
    db = folder / "mlflow.db"
    shutil.copy(template_db, db)
    return f"sqlite:///{db}"


def use_store(uri: str, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Point this process and its children at ``uri`` (working in ``cwd``) until the test ends.

    Also for a store that outlives one test: a module's shared job (see tests/distlib.py)."""
    import mlflow

    monkeypatch.chdir(cwd)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # set_experiment exports MLFLOW_EXPERIMENT_ID for child processes; through monkeypatch it
    # is taken back at teardown instead of pointing later tests' children (and shared jobs,
    # on a store without it) at this store's experiment
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "0")
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("tests")
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


@pytest.fixture
def tracking(tmp_path: Path, _template_db: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh MLflow tracking store in ``tmp_path``; the current experiment stores there too."""
    yield from use_store(fresh_store(_template_db, tmp_path), tmp_path, monkeypatch)


@dataclass(frozen=True)
class SharedStore:
    """A tracking store shared by one module's tests, with its experiment "tests"."""

    uri: str
    folder: Path
    env: dict[str, str]  # for a job's processes: this store, this experiment


@pytest.fixture(scope="module")
def module_store(_template_db: Path, tmp_path_factory: pytest.TempPathFactory) -> SharedStore:
    """A job that several tests of a module read or resume from runs once and saves here
    (tests/test_distributed.py, test_elastic.py). Its experiment is named explicitly: a
    module fixture runs outside any test's environment."""
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("module-store")
    uri = fresh_store(_template_db, folder)
    experiment_id = MlflowClient(uri).create_experiment("tests", str(folder / "mlruns"))
    env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_ID": experiment_id}
    return SharedStore(uri, folder, env)


@pytest.fixture
def module_tracking(
    module_store: SharedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """As ``tracking``, but on the module's shared store, so a test sees its shared jobs."""
    yield from use_store(module_store.uri, tmp_path, monkeypatch)

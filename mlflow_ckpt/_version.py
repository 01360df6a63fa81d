"""The package version (kept in one place; pyproject.toml mirrors it), and the one check of
the MLflow beside it that cannot wait for a call: the major version.

Checkpoints are MLflow LoggedModels, which came with MLflow 3.0; under MLflow 2 (installed
with ``--no-deps``, or pinned by a platform image) the package would fail deep in an import
(``cannot import name 'LoggedModel' from 'mlflow.entities'``) instead of naming the fix.
Within MLflow 3, a release that lacks a call is handled where the call is made
(``manager/lease.clear_lease``); .ci/compat runs the oldest and newest declared releases.
"""

import mlflow

from mlflow_ckpt.errors import MlflowVersionError

__version__ = "0.1.0"

OLDEST_MLFLOW = "3.0.0"  # pyproject.toml's lower bound, which the compatibility lane runs


def require_mlflow(found: str) -> None:
    """Raise :class:`MlflowVersionError` for an MLflow before 3 (``found`` is its version)."""
    major = found.split(".", 1)[0]
    if not major.isdigit() or int(major) < 3:
        raise MlflowVersionError(
            f"mlflow_ckpt stores checkpoints as MLflow LoggedModels, which need MLflow "
            f"{OLDEST_MLFLOW} or newer; this environment has MLflow {found}. Install "
            "mlflow_ckpt with its dependencies (pip install mlflow-ckpt) to get a supported one."
        )


require_mlflow(mlflow.__version__)

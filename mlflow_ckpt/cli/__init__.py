"""``mlflow-ckpt``: list, inspect, verify, clean up, pin, archive, promote, export, plot,
fork, average and evaluate checkpoints.

Every command talks to the tracking store named by ``--tracking-uri`` or
``MLFLOW_TRACKING_URI`` (MLflow's own default otherwise). Tables are for people, ``--json``
for scripts; progress bars appear on long transfers when stderr is a terminal.
"""

from mlflow_ckpt.cli import (  # noqa: F401 - register
    averaging,
    cleanup,
    evaluation,
    forking,
    inspection,
    publishing,
    tiers,
)
from mlflow_ckpt.cli.group import main

__all__ = ["main"]

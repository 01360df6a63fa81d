"""``mlflow-ckpt``: list, inspect, verify, clean up, pin, promote, export and plot checkpoints.

Every command talks to the tracking store named by ``--tracking-uri`` or
``MLFLOW_TRACKING_URI`` (MLflow's own default otherwise). Tables are for people, ``--json``
for scripts; progress bars appear on long transfers when stderr is a terminal.
"""

from mlflow_ckpt.cli import cleanup, inspection, publishing  # noqa: F401 - register commands
from mlflow_ckpt.cli.group import main

__all__ = ["main"]

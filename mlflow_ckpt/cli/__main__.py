"""``python -m mlflow_ckpt.cli``."""

from mlflow_ckpt.cli import main

main()

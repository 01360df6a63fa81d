"""After training: work with a run's checkpoints as a history, not only as resume points.

:func:`fork` starts a new run from any checkpoint (its history up to that step copied, the
source untouched, :mod:`.forking`), :func:`average` writes the (weighted) mean of several
checkpoints as a checkpoint of its own (:mod:`.averaging`), and :func:`evaluate` scores kept
checkpoints after the fact with metrics linked to each one (:mod:`.evaluation`). This layer
sits above the manager: a fork hands back a manager on the new run.
"""

from mlflow_ckpt.after_training.averaging import average
from mlflow_ckpt.after_training.evaluation import evaluate
from mlflow_ckpt.after_training.forking import fork

__all__ = ["average", "evaluate", "fork"]

"""After training: work with a run's checkpoints as a history, not only as resume points.

``fork`` starts a new run from any checkpoint (its history up to that step copied, the source
untouched), ``average`` writes the (weighted) mean of several checkpoints as a checkpoint of
its own, and ``evaluate`` scores kept checkpoints after the fact with metrics linked to each
one. This layer sits above the manager: a fork hands back a manager on the new run.
"""

from mlflow_ckpt.after_training.fork import fork

__all__ = ["fork"]

"""What the framework integrations share, beneath the user-facing modules.

:mod:`mlflow_ckpt.autolog`, :mod:`mlflow_ckpt.lightning` and :mod:`mlflow_ckpt.transformers`
decide *when* a framework has finished a step and *what* state it needs to resume; saving,
logging, retention and resume stay with :class:`~mlflow_ckpt.CheckpointManager`. The pieces
they share live here: the run and manager of one training (:mod:`.framework_run`), framework
values as checkpoint state (:mod:`.framework_state`), undoable monkey-patching
(:mod:`.patching`), the plain-loop checkpointer (:mod:`.plain_loop`), the files a framework
resumes from (:mod:`.resume_path`) and the temporary folder they are written into, which the
callbacks remove once read (:mod:`.resume_folder`). Nothing here imports Lightning or
transformers.
"""

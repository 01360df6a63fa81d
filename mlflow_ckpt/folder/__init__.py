"""Folder layer: the checkpoint folder format, independent of MLflow's catalog.

A checkpoint is a folder: tensor files, ``state.json``, ``MLmodel`` (so MLflow can serve it),
optional ``code/`` and ``manifest.json``, written last. This layer writes and reads such a
folder through any :class:`~mlflow_ckpt.storage.Store` and rebuilds its network from the
recorded model factory. The catalog (which folder is which checkpoint), the manager (when to
write one) and the MLflow flavor (``mlflow.pyfunc`` entry points) all build on it.
"""

from mlflow_ckpt.folder.factory import factory_path, import_factory
from mlflow_ckpt.folder.mlmodel import CODE_DIR, FLAVOR_NAME, MODEL_KEY, flavor_config
from mlflow_ckpt.folder.model import build_model, load_folder_model
from mlflow_ckpt.folder.reader import LoadedFolder, read_folder
from mlflow_ckpt.folder.writer import FolderSpec, library_versions, write_folder

__all__ = [
    "CODE_DIR",
    "FLAVOR_NAME",
    "MODEL_KEY",
    "FolderSpec",
    "LoadedFolder",
    "build_model",
    "factory_path",
    "flavor_config",
    "import_factory",
    "library_versions",
    "load_folder_model",
    "read_folder",
    "write_folder",
]

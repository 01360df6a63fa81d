"""The model factory: how a checkpoint names the code that rebuilds its network.

``MLmodel`` records ``"package.module:callable"`` plus JSON ``model_kwargs``; loading imports
that callable and calls it. The name is data read from a folder, so what it may reach is
narrowed to what a model factory can be: never the standard library or a built-in, always
a class or a plain Python function (no pickled code, no arbitrary callables).
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow_ckpt.errors import CheckpointError


def factory_path(factory: Callable[..., Any] | str | None) -> str | None:
    """Turn a module-level callable (or ``"pkg.mod:fn"``) into an import path, checking it."""
    if factory is None:
        return None
    if isinstance(factory, str):
        path = factory
    else:
        module = getattr(factory, "__module__", None)
        qualname = getattr(factory, "__qualname__", None)
        if not module or not qualname or "<" in qualname or module == "__main__":
            raise ValueError(
                f"model_factory={factory!r} must be importable: a function or class defined at "
                "module level in an importable module (not __main__, not a lambda), or a "
                "'package.module:function' string."
            )
        path = f"{module}:{qualname}"
    import_factory(path)
    return path


def import_factory(path: str, code_dir: Path | None = None) -> Callable[..., Any]:
    """Import ``"pkg.mod:qualname"``: a class or Python function of the user's own code.

    ``code_dir`` is a checkpoint's verified ``code/`` folder: like MLflow's ``code_paths`` it
    goes first on ``sys.path``, so a checkpoint loads where its package is not installed.
    """
    module_name, _, qualname = path.partition(":")
    top = module_name.split(".")[0]
    if not qualname or top in sys.stdlib_module_names or top == "builtins":
        raise CheckpointError(
            f"Refusing model factory {path!r}: a factory is 'package.module:callable' from "
            "your own code, never from the standard library. The MLmodel file may have been "
            "tampered with."
        )
    if code_dir is not None and str(code_dir) not in sys.path:
        sys.path.insert(0, str(code_dir))
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as exc:
        raise CheckpointError(
            f"Cannot import model factory {path!r} ({exc}); install the package that defines "
            "it, add its folder to sys.path, or save checkpoints with code_paths=[...] so "
            "they carry it."
        ) from exc
    if not (inspect.isclass(obj) or inspect.isfunction(obj)):
        raise CheckpointError(
            f"Refusing model factory {path!r}: it is a {type(obj).__name__}, not a class or a "
            "Python function."
        )
    return obj

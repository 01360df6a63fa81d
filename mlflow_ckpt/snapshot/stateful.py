"""The Stateful protocol: objects that checkpoint themselves, and how each kind is restored.

Anything with ``state_dict()``/``load_state_dict()`` (modules, optimizers, schedulers,
``GradScaler``, samplers, a user's own class) is Stateful, as in PyTorch's DCP and
Lightning. Random generators (``torch.Generator``, ``random.Random``, NumPy's) speak other
protocols; each gets a *kind* name here, recorded in the saved document, so a restore applies
the right one and a forged document cannot name a protocol that does not exist.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class Stateful(Protocol):
    """What the manager saves and restores: ``state_dict()`` out, ``load_state_dict()`` in."""

    def state_dict(self) -> Mapping[str, Any]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> Any: ...


STATE_DICT = "state_dict"
TORCH_GENERATOR = "torch.Generator"
PY_RANDOM = "random.Random"
NP_GENERATOR = "numpy.Generator"
NP_RANDOM_STATE = "numpy.RandomState"


@dataclass(frozen=True)
class StatefulValue:
    """The saved state of a stateful object, and which protocol restores it."""

    kind: str
    value: Any


def is_stateful(obj: Any) -> bool:
    """Whether ``obj`` follows the ``state_dict()``/``load_state_dict()`` protocol."""
    return (
        not isinstance(obj, Mapping | torch.Tensor | type)
        and callable(getattr(obj, "state_dict", None))
        and callable(getattr(obj, "load_state_dict", None))
    )


def stateful_kind(obj: Any) -> str | None:
    """The restore protocol ``obj`` supports, or ``None`` if it is plain data."""
    if isinstance(obj, torch.Generator):
        return TORCH_GENERATOR
    if isinstance(obj, random.Random):
        return PY_RANDOM
    if isinstance(obj, np.random.Generator):
        return NP_GENERATOR
    if isinstance(obj, np.random.RandomState):
        return NP_RANDOM_STATE
    if is_stateful(obj):
        return STATE_DICT
    return None


def unwrap_module(obj: Any) -> Any:
    """The module a wrapper trains: ``torch.compile``'s ``OptimizedModule`` and
    ``DataParallel``/``DistributedDataParallel`` add a prefix (``_orig_mod.``, ``module.``) to
    every state_dict key. Saving and restoring the inner module keys a checkpoint like the
    plain model, so it loads into the unwrapped network, into another wrapper, and into the
    plain model the pyfunc flavor's ``model_factory`` builds."""
    while isinstance(obj, torch.nn.Module):
        if type(obj).__name__ == "OptimizedModule" and isinstance(
            getattr(obj, "_orig_mod", None), torch.nn.Module
        ):
            obj = obj._orig_mod
        elif isinstance(obj, torch.nn.DataParallel | torch.nn.parallel.DistributedDataParallel):
            obj = obj.module
        else:
            break
    return obj


def capture_stateful(obj: Any, kind: str) -> Any:
    """Read the state of a stateful object (see :func:`stateful_kind`)."""
    if kind == TORCH_GENERATOR:
        return obj.get_state()
    if kind == PY_RANDOM:
        return obj.getstate()
    if kind == NP_GENERATOR:
        return obj.bit_generator.state
    if kind == NP_RANDOM_STATE:
        return obj.get_state()
    return unwrap_module(obj).state_dict()


def apply_stateful(obj: Any, kind: str, value: Any) -> None:
    """Write a saved state back into a stateful object."""
    if kind == TORCH_GENERATOR:
        obj.set_state(value)
    elif kind == PY_RANDOM:
        obj.setstate(value)
    elif kind == NP_GENERATOR:
        obj.bit_generator.state = value
    elif kind == NP_RANDOM_STATE:
        obj.set_state(value)
    else:
        unwrap_module(obj).load_state_dict(value)


KINDS = (STATE_DICT, TORCH_GENERATOR, PY_RANDOM, NP_GENERATOR, NP_RANDOM_STATE)

"""Compressed tensors restored straight into a module's own parameters and buffers.

A module's ``load_state_dict`` copies each tensor it is given into a parameter or buffer
that already exists. For a compressed checkpoint that tensor would be new memory its byte
planes were just interleaved into: a page fault per 4 KiB of it and then a second copy, the
larger part of what a compressed load costs beyond an uncompressed one (README,
Compression). So for a *plain* module, one whose ``load_state_dict`` is nothing but those
copies, the reader leaves the compressed tensors as
:class:`~mlflow_ckpt.codec.planar.PlanarTensor` (every frame decoded and checked, planes
not interleaved), and the restore, once every check has passed, interleaves them into the
module's own tensors and then runs ``load_state_dict`` as usual on those very tensors (a
copy onto itself copies nothing). Restoring stays all-or-nothing: nothing left to do at
that point can fail on the checkpoint's bytes.

Everything else (modules with hooks or their own loading code, tensors of other objects)
gets ordinary tensors: :func:`settle` interleaves them into new memory before planning.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.instancenorm import _InstanceNorm

from mlflow_ckpt.codec.planar import PlanarTensor, write_all
from mlflow_ckpt.snapshot.stateful import StatefulValue, apply_stateful, unwrap_module

# ``_load_from_state_dict`` overrides known to touch only their own module's keys (they
# add a missing ``num_batches_tracked`` or check running stats, then load as usual).
_OWN_KEYS_ONLY = (
    torch.nn.Module._load_from_state_dict,
    _NormBase._load_from_state_dict,
    _InstanceNorm._load_from_state_dict,
)


def direct_destinations(obj: Any) -> dict[str, torch.Tensor] | None:
    """The parameters and buffers ``load_state_dict`` would copy into, by state_dict key,
    if ``obj`` is a module whose loading is nothing but those copies; ``None`` otherwise.

    Not plain: a class with its own ``state_dict``/``load_state_dict``/``_save_to_state_dict``,
    an unknown ``_load_from_state_dict``, or any state_dict hook (a hook may rename or
    convert what it is given). Extra state (``get_extra_state``) is not a destination."""
    module = unwrap_module(obj)
    if not isinstance(module, torch.nn.Module):
        return None
    base = torch.nn.Module
    cls = type(module)
    if cls.load_state_dict is not base.load_state_dict or cls.state_dict is not base.state_dict:
        return None
    for sub in module.modules():
        kind = type(sub)
        if (
            kind._load_from_state_dict not in _OWN_KEYS_ONLY
            or kind._save_to_state_dict is not base._save_to_state_dict
            or sub._load_state_dict_pre_hooks
            or sub._state_dict_hooks
            or sub._state_dict_pre_hooks
        ):
            return None
    own = {
        id(t)
        for _, t in (
            *module.named_parameters(remove_duplicate=False),
            *module.named_buffers(remove_duplicate=False),
        )
    }
    return {
        key: tensor
        for key, tensor in module.state_dict(keep_vars=True).items()
        if isinstance(tensor, torch.Tensor) and id(tensor) in own
    }


def planar_names(targets: Mapping[str, Any]) -> set[str]:
    """The checkpoint tensor names a restore into ``targets`` can take as planes: each
    plain module's own tensors, under the names a snapshot gives them (``name/key``)."""
    names: set[str] = set()
    for name, target in targets.items():
        for key, tensor in (direct_destinations(target) or {}).items():
            if tensor.device.type == "cpu" and tensor.is_contiguous():
                names.add(f"{name}/{key}")
    return names


def settle(targets: Mapping[str, Any], saved: Mapping[str, Any]) -> dict[str, Any]:
    """``saved`` with every :class:`PlanarTensor` interleaved into new memory, except those
    a plain module in ``targets`` will take directly (:func:`load_module`)."""
    out: dict[str, Any] = {}
    for name, value in saved.items():
        destinations = direct_destinations(targets[name]) if name in targets else None
        if destinations and isinstance(value, StatefulValue) and isinstance(value.value, Mapping):
            kept = _rebuilt(
                value.value,
                [
                    (key, item)
                    if isinstance(item, PlanarTensor)
                    and key in destinations
                    and item.fits(destinations[key])
                    else (key, interleaved(item))
                    for key, item in value.value.items()
                ],
            )
            out[name] = dataclasses.replace(value, value=kept)
        else:
            out[name] = interleaved(value)
    return out


def interleaved(value: Any) -> Any:
    """``value`` with every :class:`PlanarTensor` in it replaced by a tensor in new memory;
    containers without one are returned as they are."""
    if isinstance(value, PlanarTensor):
        return value.materialize()
    if isinstance(value, StatefulValue):
        inner = interleaved(value.value)
        return value if inner is value.value else dataclasses.replace(value, value=inner)
    if type(value) in (dict, OrderedDict):
        items = [(key, interleaved(item)) for key, item in value.items()]
        if all(new is old for (_, new), old in zip(items, value.values(), strict=True)):
            return value
        return _rebuilt(value, items)
    if type(value) in (list, tuple):
        converted = [interleaved(item) for item in value]
        if all(new is old for new, old in zip(converted, value, strict=True)):
            return value
        return type(value)(converted)
    return value


def _rebuilt(original: Mapping[str, Any], items: list[tuple[str, Any]]) -> Any:
    out = (type(original) if type(original) in (dict, OrderedDict) else dict)(items)
    if hasattr(original, "_metadata"):  # (a module's state_dict: its versions)
        out._metadata = original._metadata  # type: ignore[attr-defined]
    return out


def load_module(target: Any, kind: str, saved: Mapping[str, Any]) -> None:
    """Restore a module (checked): planes into its own tensors, then ``load_state_dict``."""
    if any(isinstance(item, PlanarTensor) for item in saved.values()):
        destinations = direct_destinations(target) or {}
        items = []
        direct: dict[int, tuple[PlanarTensor, torch.Tensor]] = {}
        for key, item in saved.items():
            if isinstance(item, PlanarTensor):
                dest = destinations.get(key)
                if (
                    dest is not None
                    and item.fits(dest)
                    # (a tied weight is one destination: written once, from one tensor)
                    and direct.setdefault(id(dest), (item, dest))[0] is item
                ):
                    item = dest  # load_state_dict then copies it onto itself: no copy
                else:  # (settle kept only fitting ones: not reached unless the module changed)
                    item = item.materialize()
            items.append((key, item))
        write_all(list(direct.values()))  # (every block of the module at once, on every core)
        saved = _rebuilt(saved, items)
    apply_stateful(target, kind, saved)

"""Compressed tensors restored straight into a module's own parameters and buffers.

A module's ``load_state_dict`` copies each tensor it is given into a parameter or buffer
that already exists. For a compressed checkpoint that tensor would be new memory its byte
planes were just interleaved into: a page fault per 4 KiB of it and then a second copy.
Loading a 604 MB model + AdamW checkpoint in-process without this took 1.40x as long
(``benchmarks/compressed_load.py --direct``: median of 12 per-pair ratios, pairs in
alternating order, 2026-12-06, a busy 2-core VM). So for the tensors of a module target,
the reader leaves the compressed ones as :class:`~mlflow_ckpt.codec.planar.PlanarTensor`
(every frame decoded and checked, planes not interleaved), and this module interleaves each
one into the parameter ``load_state_dict`` copies it into, at that copy. Everything else of
decode-into-parameters lives here too: the modules that plan and apply a restore see
ordinary tensors.

How, with torch's public API only: the module is handed, for each such key, a stand-in (a
detached alias of the parameter it names: right dtype and shape) and ``load_state_dict``
runs under a :class:`~torch.overrides.TorchFunctionMode`. ``param.copy_(stand_in)`` into
that very parameter becomes "interleave the planes into it"; any other use of a stand-in
(a hook reading it, a loader converting it, a copy elsewhere) gets the tensor interleaved
into new memory instead, exactly what the plain path would have given. So a module with
hooks or loading code of its own restores exactly as through ``load_state_dict`` with
decoded tensors; only plain copies skip the new memory. Restoring stays all-or-nothing:
the planes were checked when the file was read, before anything is planned or written.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from mlflow_ckpt.codec.planar import PlanarTensor, write_all
from mlflow_ckpt.snapshot.changes import holds_bytes
from mlflow_ckpt.snapshot.stateful import StatefulValue, apply_stateful, unwrap_module

DIRECT = True
"""Whether restores interleave compressed tensors straight into parameters (the benchmark
and tests switch it off to measure and check the plain path)."""

# What ``load_state_dict`` asks of a tensor besides copying it: metadata only, answered by
# the stand-in itself (it has the saved tensor's dtype and shape) without its values.
_METADATA = frozenset(
    getattr(torch.Tensor, name).__get__
    for name in ("shape", "dtype", "device", "is_meta", "layout", "requires_grad", "ndim")
) | {torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel}


def planar_names(targets: Mapping[str, Any]) -> set[str]:
    """The checkpoint tensor names a restore into ``targets`` can take as planes: each
    module's own parameters and buffers in plain CPU memory, under the names a snapshot
    gives them (``name/key``)."""
    if not DIRECT:
        return set()
    return {
        f"{name}/{key}"
        for name, target in targets.items()
        for key, tensor in _destinations(target).items()
        if tensor.device.type == "cpu" and tensor.is_contiguous()
    }


def _destinations(obj: Any) -> dict[str, torch.Tensor]:
    """The module's own parameters and buffers by ``state_dict`` key (``{}`` for anything
    that is not a module): where a plain ``load_state_dict`` copies each key."""
    module = unwrap_module(obj)
    if not isinstance(module, torch.nn.Module):
        return {}
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


@dataclasses.dataclass
class _Pending:
    planes: PlanarTensor
    dest: torch.Tensor


class Settled:
    """Saved state ready to plan and apply: each :class:`PlanarTensor` a module target
    takes replaced by a stand-in, every other one interleaved into new memory."""

    def __init__(self, targets: Mapping[str, Any], saved: Mapping[str, Any]) -> None:
        self._pending: dict[int, _Pending] = {}
        self.state: dict[str, Any] = {}
        for name, value in saved.items():
            destinations = _destinations(targets[name]) if name in targets else {}
            if destinations and isinstance(value, StatefulValue):
                inner = value.value
                if isinstance(inner, Mapping):
                    inner = self._stand_ins(inner, destinations)
                    self.state[name] = dataclasses.replace(value, value=inner)
                    continue
            self.state[name] = interleaved(value)

    def _stand_ins(self, saved: Mapping[str, Any], destinations: dict[str, torch.Tensor]) -> Any:
        items = []
        for key, item in saved.items():
            dest = destinations.get(key)
            if isinstance(item, PlanarTensor) and dest is not None and item.fits(dest):
                stand_in = dest.detach()  # (an alias of its own identity: see load_module)
                self._pending[id(stand_in)] = _Pending(item, dest)
                item = stand_in
            items.append((key, interleaved(item)))
        return _rebuilt(saved, items)

    def load_module(self, target: Any, kind: str, saved: Mapping[str, Any]) -> None:
        """Restore a module (checked): ``load_state_dict`` as usual, each copy of a
        stand-in into its own parameter done by interleaving the planes into it."""
        if not self._pending:
            apply_stateful(target, kind, saved)
            return
        with _Interleaving(self._pending):
            apply_stateful(target, kind, saved)


class _Interleaving(TorchFunctionMode):
    """Runs ``load_state_dict``: a stand-in copied into its parameter interleaves the
    planes there; anywhere else it is the tensor in new memory (see the module doc)."""

    def __init__(self, pending: dict[int, _Pending]) -> None:
        super().__init__()
        self._pending = pending

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.copy_ and len(args) == 2:
            pending = self._pending.get(id(args[1]))
            if pending is not None and args[0] is pending.dest:
                planes = pending.planes
                if planes.materialized is not None:  # (read, maybe changed, by a hook)
                    return pending.dest.copy_(planes.materialized, **kwargs)
                write_all([(planes, pending.dest)])
                return pending.dest
        if func not in _METADATA:
            return func(*self._swapped(args), **self._swapped(kwargs))
        return func(*args, **kwargs)

    def _swapped(self, value: Any) -> Any:
        """``value`` with every stand-in in it replaced by its tensor in new memory."""
        if isinstance(value, torch.Tensor):
            pending = self._pending.get(id(value))
            return value if pending is None else pending.planes.materialize()
        if type(value) in (list, tuple):
            return type(value)(self._swapped(item) for item in value)
        if type(value) is dict:
            return {key: self._swapped(item) for key, item in value.items()}
        return value


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
    out: dict[str, Any] = OrderedDict(items) if type(original) is OrderedDict else dict(items)
    if hasattr(original, "_metadata"):  # (a module's state_dict: its versions)
        out._metadata = original._metadata  # type: ignore[attr-defined]
    return out


def holds(live: torch.Tensor, saved: Any) -> bool:
    """Whether ``live`` holds exactly the bytes of ``saved`` (a checkpoint tensor, kept as
    planes or not): planes are compared block by block, with no tensor in new memory."""
    if isinstance(saved, PlanarTensor):
        return saved.equals(live)
    return holds_bytes(live, saved)

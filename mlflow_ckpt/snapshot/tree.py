"""Turn nested training state into JSON plus a flat dict of tensors, and back.

Pickle is what makes ``torch.save`` checkpoints dangerous to load, so the non-tensor part of
the state (optimizer hyper-parameters, scheduler counters, RNG states...) is stored as JSON.
JSON lacks tuples, non-string keys, NaN and bytes, so those are written as small tagged
objects (``{"__tuple__": [...]}``...). Anything else is refused with the path to the object
and how to make it storable, rather than silently pickled.
"""

from __future__ import annotations

import base64
import collections
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import torch

from mlflow_ckpt.errors import CheckpointCorruptedError, StateSerializationError
from mlflow_ckpt.snapshot.changes import identity_of
from mlflow_ckpt.snapshot.stateful import KINDS, StatefulValue, capture_stateful, stateful_kind

if TYPE_CHECKING:
    from mlflow_ckpt.codec.planar import PlanarTensor

Json = Any
# A checkpoint's tensors read back, by name: compressed ones a restore will interleave into
# live tensors itself may still be byte planes (codec/planar.py, applied by direct.py).
SavedTensors: TypeAlias = "Mapping[str, torch.Tensor | PlanarTensor]"


class TensorSink:
    """Collects the tensors met while encoding, under unique names.

    Tensors that share storage (tied weights, the same tensor referenced twice) are stored
    once and referenced twice. ``copy`` turns each tensor into what will be written (a host
    copy for snapshots; identity when the caller already owns the data).
    """

    def __init__(
        self,
        copy: Callable[[torch.Tensor], torch.Tensor],
        observe: Callable[[str, torch.Tensor, tuple[Any, ...]], bool] | None = None,
    ) -> None:
        self._copy = copy
        # Incremental saves: told every tensor; True = the previous save's bytes stand, so
        # the live tensor is kept uncopied (it is never read; see snapshot.changes).
        self._observe = observe
        self._seen: dict[tuple[Any, ...], str] = {}
        # Originals stay referenced until encoding ends: a temporary (a generator's
        # get_state()) freed early could hand its address to the next tensor, which would
        # then be mistaken for a shared view of it.
        self._originals: list[torch.Tensor] = []
        self.tensors: dict[str, torch.Tensor] = {}

    def add(self, path: str, tensor: torch.Tensor) -> str:
        if tensor.layout != torch.strided or tensor.is_quantized or tensor.device.type == "meta":
            raise StateSerializationError(
                f"state[{path!r}] is a {tensor.layout} / quantized / meta tensor, which cannot "
                "be checkpointed; convert it to a dense tensor in state_dict()."
            )
        identity = identity_of(tensor)
        if identity[0] != 0 and identity in self._seen:
            return self._seen[identity]
        name = path
        counter = 1
        while name in self.tensors:
            counter += 1
            name = f"{path}#{counter}"
        self._keep(name, tensor, tensor)
        if identity[0] != 0:
            self._seen[identity] = name
            self._originals.append(tensor)
        return name

    def _keep(self, name: str, tensor: torch.Tensor, observed: torch.Tensor) -> None:
        """Store ``tensor`` under ``name``: uncopied if the observer says the previous
        save's bytes of ``observed`` (the memory a snapshot sees: a DTensor's local shard)
        still stand, copied otherwise."""
        identity = identity_of(observed)
        if (
            identity[0] != 0
            and self._observe is not None
            and self._observe(name, observed, identity)
        ):
            self.tensors[name] = tensor.detach()
        else:
            self.tensors[name] = self._copy(tensor)


def encode(obj: Any, path: str, sink: TensorSink) -> Json:
    """Encode ``obj`` as JSON, sending tensors to ``sink``; ``path`` names it in errors."""
    if obj is None or isinstance(obj, bool | str | int):
        return obj
    if isinstance(obj, float):  # (NumPy's float64 too: a float)
        return obj if math.isfinite(obj) else {"__float__": str(obj)}
    if isinstance(obj, torch.Tensor | np.ndarray | np.generic):
        return _encode_array(obj, path, sink)
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    if isinstance(obj, torch.device):
        return {"__device__": str(obj)}
    if isinstance(obj, bytes):
        return {"__bytes__": base64.b64encode(obj).decode()}
    if isinstance(obj, Mapping | tuple | list | set | frozenset):
        return _encode_container(obj, path, sink)
    kind = stateful_kind(obj)
    if kind is not None:
        return {"__stateful__": kind, "value": encode(capture_stateful(obj, kind), path, sink)}
    raise StateSerializationError(
        f"state[{path!r}] is a {type(obj).__module__}.{type(obj).__qualname__}, which cannot be "
        "checkpointed without pickle (pickled code is never loaded). Make it Stateful: give "
        "it state_dict() returning tensors/numbers/strings/lists/dicts and load_state_dict() "
        "to restore them, or leave it out of the state."
    )


def _encode_array(obj: torch.Tensor | np.ndarray | np.generic, path: str, sink: TensorSink) -> Json:
    """A tensor or NumPy array goes to ``sink`` (JSON keeps its name); a NumPy scalar stays
    in the JSON with its dtype."""
    if isinstance(obj, torch.Tensor):
        return {"__tensor__": sink.add(path, obj)}
    if isinstance(obj, np.generic):
        return {"__npscalar__": [obj.dtype.str, encode(obj.item(), path, sink)]}
    if obj.dtype == object or obj.dtype.byteorder == ">":
        raise StateSerializationError(
            f"state[{path!r}] is a NumPy array of dtype {obj.dtype}, which cannot be "
            "stored without pickle; convert it to a numeric array or a list."
        )
    return {"__ndarray__": sink.add(path, torch.from_numpy(np.ascontiguousarray(obj)))}


def _encode_container(obj: Any, path: str, sink: TensorSink) -> Json:
    """Mappings, tuples, lists and sets: JSON has only lists and string-keyed objects, so
    the others are tagged; each item is named by its key or position in errors."""
    if isinstance(obj, Mapping):
        return _encode_mapping(obj, path, sink)
    if isinstance(obj, list):
        return [encode(v, f"{path}/{i}", sink) for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, f"{path}/{i}", sink) for i, v in enumerate(obj)]}
    items = sorted(obj, key=repr)
    return {"__set__": [encode(v, f"{path}/{i}", sink) for i, v in enumerate(items)]}


def _encode_mapping(obj: Mapping[Any, Any], path: str, sink: TensorSink) -> Json:
    meta = getattr(obj, "_metadata", None)
    plain = all(isinstance(k, str) and not k.startswith("__") for k in obj) and meta is None
    if plain:
        return {k: encode(v, f"{path}/{k}", sink) for k, v in obj.items()}
    items = [[encode(k, path, sink), encode(v, f"{path}/{k}", sink)] for k, v in obj.items()]
    node: dict[str, Json] = {"__items__": items}
    if isinstance(obj, collections.OrderedDict):
        node["__ordered__"] = True
    if meta is not None:
        node["__metadata__"] = encode(meta, f"{path}/_metadata", sink)
    return node


_NPSCALAR_KINDS = "biufc"  # bool, integers, floats, complex: scalars without pickle


def decode(node: Json, tensors: SavedTensors, path: str = "") -> Any:
    """Rebuild what :func:`encode` wrote. Stateful objects come back as :class:`StatefulValue`.

    Anything :func:`encode` cannot have written (unknown tags, payloads of the wrong type,
    references to tensors that are not there) raises :class:`CheckpointCorruptedError`
    naming the path in the state.
    """
    if node is None or isinstance(node, bool | str | int | float):
        return node
    if isinstance(node, list):
        return [decode(v, tensors, f"{path}/{i}") for i, v in enumerate(node)]
    if not isinstance(node, dict):
        raise _bad(path, f"unexpected JSON value {node!r}")
    if len(node) == 1 or "__items__" in node or "__stateful__" in node:
        tag = next(iter(node)) if len(node) == 1 else None
        try:
            return _decode_tagged(node, tag, tensors, path)
        except CheckpointCorruptedError:
            raise
        except (ValueError, TypeError, RuntimeError, LookupError, OverflowError) as exc:
            raise _bad(
                path, f"invalid {tag or 'tagged'} value ({type(exc).__name__}: {exc})"
            ) from exc
        except _Untagged:
            pass
    if any(k.startswith("__") for k in node):
        raise _bad(path, f"unknown tagged object with keys {sorted(node)[:5]}")
    return {k: decode(v, tensors, f"{path}/{k}") for k, v in node.items()}


class _Untagged(Exception):
    """A one-key object whose key is not a tag: decoded as a plain dict."""


def _decode_tagged(node: dict[str, Json], tag: str | None, tensors: SavedTensors, path: str) -> Any:
    if tag is not None and (decoder := _TAGS.get(tag)) is not None:
        return decoder(node[tag], tag, tensors, path)
    if "__items__" in node:
        return _decode_items(node, tensors, path)
    if "__stateful__" in node:
        kind = node["__stateful__"]
        if not isinstance(kind, str) or kind not in KINDS:
            raise _bad(path, f"unknown stateful kind {kind!r}; known: {', '.join(KINDS)}")
        return StatefulValue(kind, decode(node.get("value"), tensors, path))
    raise _Untagged


def _decode_tensor(payload: Json, tag: str, tensors: SavedTensors, path: str) -> Any:
    if not isinstance(payload, str) or payload not in tensors:
        raise _bad(path, f"references tensor {payload!r}, which is not in the tensor files")
    tensor = tensors[payload]
    # (a compressed tensor kept as byte planes gives its values to ``numpy()`` too)
    return tensor if tag == "__tensor__" else tensor.numpy()


def _decode_float(payload: Json, tag: str, tensors: SavedTensors, path: str) -> Any:
    return float(_checked(path, str, payload, lambda v: v in ("nan", "inf", "-inf")))


def _decode_tuple(payload: Json, tag: str, tensors: SavedTensors, path: str) -> Any:
    return tuple(decode(_list(path, payload), tensors, path))


def _decode_set(payload: Json, tag: str, tensors: SavedTensors, path: str) -> Any:
    return set(decode(_list(path, payload), tensors, path))


def _decode_bytes(payload: Json, tag: str, tensors: SavedTensors, path: str) -> Any:
    return base64.b64decode(_checked(path, str, payload), validate=True)


def _decode_dtype(payload: Json, tag: str, tensors: SavedTensors, path: str) -> Any:
    dtype = getattr(torch, _checked(path, str, payload), None)
    if not isinstance(dtype, torch.dtype):
        raise _bad(path, f"unknown dtype {payload!r}")
    return dtype


def _decode_device(payload: Json, tag: str, tensors: SavedTensors, path: str) -> Any:
    return torch.device(_checked(path, str, payload))


def _decode_npscalar(payload: Json, tag: str, tensors: SavedTensors, path: str) -> Any:
    pair = _list(path, payload)
    if len(pair) != 2:
        raise _bad(path, "__npscalar__ holds a [dtype, value] pair")
    dtype = np.dtype(_checked(path, str, pair[0]))
    if dtype.kind not in _NPSCALAR_KINDS:
        raise _bad(path, f"NumPy scalar of dtype {dtype} is not allowed")
    value = decode(pair[1], tensors, path)
    if isinstance(value, str):  # NumPy would parse strings; encode never writes one
        raise _bad(path, f"NumPy scalar value {value!r} is not a number")
    return dtype.type(value)


# One-key tagged objects: the tag, and how its payload is decoded.
_TAGS: dict[str, Callable[[Json, str, SavedTensors, str], Any]] = {
    "__tensor__": _decode_tensor,
    "__ndarray__": _decode_tensor,
    "__float__": _decode_float,
    "__tuple__": _decode_tuple,
    "__set__": _decode_set,
    "__bytes__": _decode_bytes,
    "__dtype__": _decode_dtype,
    "__device__": _decode_device,
    "__npscalar__": _decode_npscalar,
}


def _decode_items(node: dict[str, Json], tensors: SavedTensors, path: str) -> Any:
    pairs = _list(path, node["__items__"])
    out: dict[Any, Any] = collections.OrderedDict() if node.get("__ordered__") else {}
    for pair in pairs:
        if len(_list(path, pair)) != 2:
            raise _bad(path, "__items__ holds [key, value] pairs")
        key, value = pair
        key = decode(key, tensors, path)
        out[key] = decode(value, tensors, f"{path}/{key}")
    if "__metadata__" in node:
        out._metadata = decode(node["__metadata__"], tensors, f"{path}/_metadata")  # type: ignore[attr-defined]
    return out


def plain(value: Any) -> Any:
    """Strip :class:`StatefulValue` wrappers: the raw state, with no objects to restore into."""
    if isinstance(value, StatefulValue):
        return plain(value.value)
    if isinstance(value, dict):
        out = type(value)((k, plain(v)) for k, v in value.items())
        if hasattr(value, "_metadata"):
            out._metadata = value._metadata  # type: ignore[attr-defined]
        return out
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    return value


def _bad(path: str, problem: str) -> CheckpointCorruptedError:
    return CheckpointCorruptedError(f"state structure at {path or '/'}: {problem}")


def _list(path: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise _bad(path, f"expected a list, got {type(value).__name__}")
    return value


def _checked(path: str, kind: type, value: Any, ok: Callable[[Any], bool] = lambda _: True) -> Any:
    if not isinstance(value, kind) or not ok(value):
        raise _bad(path, f"invalid value {value!r}")
    return kind(value)

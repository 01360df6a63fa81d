"""Exporting a checkpoint's model: ONNX (verified) and a single standard safetensors file."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from mlflow import MlflowClient

from mlflow_ckpt.catalog.checkpoint import Checkpoint
from mlflow_ckpt.catalog.loading import load_model, load_training_state
from mlflow_ckpt.catalog.resolve import resolve
from mlflow_ckpt.errors import CheckpointError
from mlflow_ckpt.storage import open_store
from mlflow_ckpt.storage.staging import scratch_dir

logger = logging.getLogger(__name__)

ONNX_NAME = "export/model.onnx"


def export_onnx(
    checkpoint_or_uri: Checkpoint | str,
    example_input: torch.Tensor | np.ndarray,
    path: str | Path | None = None,
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    client: MlflowClient | None = None,
) -> str:
    """Export the checkpoint's model (rebuilt via ``model_factory``) to ONNX and verify it.

    The file is checked with ``onnx.checker`` and run with ``onnx.reference`` on
    ``example_input``; its output must match torch's within ``rtol``/``atol``. Without
    ``path`` it is stored next to the checkpoint (``<artifacts>/export/model.onnx``). Returns
    where it was written. The batch dimension is exported as dynamic.
    """
    try:
        import onnx
        from onnx.reference import ReferenceEvaluator
    except ImportError as exc:
        raise CheckpointError("ONNX export needs `pip install onnx onnxscript`") from exc
    client = client or MlflowClient()
    logged = resolve(checkpoint_or_uri, client)
    model = load_model(checkpoint_or_uri, client=client)
    example = torch.as_tensor(example_input)
    with torch.no_grad():
        expected = model(example).detach().cpu().numpy()
    with scratch_dir("onnx") as scratch:
        local = scratch / "model.onnx"
        _torch_export(model, example, local)
        proto = onnx.load(str(local))
        onnx.checker.check_model(proto)
        feed = {proto.graph.input[0].name: example.numpy()}
        # run() gives a list (a dict only with intermediate=True); onnx annotates it as either
        outputs = cast(list[Any], ReferenceEvaluator(proto).run(None, feed))
        got = outputs[0]
        if got.shape != expected.shape or not np.allclose(got, expected, rtol=rtol, atol=atol):
            raise CheckpointError(
                f"ONNX export of {logged.model_id} does not reproduce the torch output "
                f"(max abs diff {np.max(np.abs(got - expected)):.3g}); not written."
            )
        if path is not None:
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(local.read_bytes())
            return str(target)
        with open_store(logged.artifact_location) as store:
            store.write_bytes(ONNX_NAME, local.read_bytes())
        return f"{logged.artifact_location.rstrip('/')}/{ONNX_NAME}"


def _torch_export(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                model, (example,), dynamo=True, dynamic_shapes=({0: batch},), verbose=False
            )
            if program is None:  # (only the TorchScript exporter returns none)
                raise CheckpointError("the dynamo ONNX exporter returned no program")
            program.save(str(path))
            return
        except Exception as exc:  # fall back to the TorchScript exporter
            logger.info("dynamo ONNX export failed (%s); trying the TorchScript exporter", exc)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )


def export_safetensors(
    checkpoint_or_uri: Checkpoint | str,
    path: str | Path,
    *,
    key: str = "model",
    client: MlflowClient | None = None,
) -> str:
    """Write ``state[key]``'s tensors as one standard ``.safetensors`` file (for other tools)."""
    from safetensors.torch import save_file

    state = load_training_state(checkpoint_or_uri, client=client)
    if key not in state or not isinstance(state[key], dict):
        raise CheckpointError(f"the checkpoint has no state dict named {key!r}")
    tensors: dict[str, torch.Tensor] = {}
    for name, value in _flat_tensors(state[key]):
        tensors[name] = value.contiguous().clone()  # clones: safetensors refuses shared storage
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target), metadata={"format": "pt"})
    return str(target)


def _flat_tensors(tree: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    if isinstance(tree, torch.Tensor):
        return [(prefix, tree)]
    out: list[tuple[str, torch.Tensor]] = []
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list | tuple):
        items = enumerate(tree)
    else:
        return out
    for k, v in items:
        out.extend(_flat_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def diff_checkpoints(
    a: Checkpoint | str, b: Checkpoint | str, *, client: MlflowClient | None = None
) -> list[dict[str, Any]]:
    """Compare the tensors of two checkpoints: one row per tensor name.

    Each row has ``name``, ``status`` (``same``, ``changed``, ``shape``/``dtype`` differs,
    ``only in a``/``only in b``) and ``max_abs_diff`` (for comparable tensors).
    """
    left = dict(_flat_tensors(load_training_state(a, client=client)))
    right = dict(_flat_tensors(load_training_state(b, client=client)))
    rows: list[dict[str, Any]] = []
    for name in sorted(set(left) | set(right)):
        x, y = left.get(name), right.get(name)
        row: dict[str, Any] = {"name": name, "max_abs_diff": None}
        if x is None or y is None:
            row["status"] = "only in a" if y is None else "only in b"
        elif x.shape != y.shape:
            row["status"] = "shape differs"
        elif x.dtype != y.dtype:
            row["status"] = "dtype differs"
        else:
            same = torch.equal(x, y)
            row["status"] = "same" if same else "changed"
            if x.numel() and (x.is_floating_point() or x.is_complex()):
                row["max_abs_diff"] = float((x.double() - y.double()).abs().max())
            elif x.numel():
                row["max_abs_diff"] = float((x.long() - y.long()).abs().max()) if not same else 0.0
        rows.append(row)
    return rows

"""Each checkpoint is also a pyfunc model and can rebuild its network via model_factory."""

from __future__ import annotations

import importlib
import shutil
import sys
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import mlflow_ckpt
import mlflow_ckpt.flavor
from mlflow_ckpt.cli import main as cli
from tests.train_script import DIM, Net


def test_pyfunc_predicts_like_the_model_and_load_model_rebuilds_it(tracking: str) -> None:
    torch.manual_seed(0)
    model = Net()
    with mlflow.start_run(run_name="f") as run:
        with mlflow_ckpt.CheckpointManager(
            {"model": model}, model_factory=Net, async_save=False
        ) as mgr:
            mgr.save(0)
    ckpt = mlflow_ckpt.latest_checkpoint(run.info.run_id)
    batch = np.random.default_rng(0).normal(size=(5, DIM)).astype(np.float32)
    model.eval()
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    served = mlflow.pyfunc.load_model(ckpt.uri).predict(batch)
    np.testing.assert_array_equal(served, expected)
    rebuilt = mlflow_ckpt.load_model(ckpt.uri)
    assert isinstance(rebuilt, Net) and not rebuilt.training
    with torch.no_grad():
        np.testing.assert_array_equal(rebuilt(torch.from_numpy(batch)).numpy(), expected)


def test_load_model_without_factory_explains_the_fix(tracking: str) -> None:
    with mlflow.start_run(run_name="f") as run:
        with mlflow_ckpt.CheckpointManager({"model": Net()}, async_save=False) as mgr:
            mgr.save(0)
    ckpt = mlflow_ckpt.latest_checkpoint(run.info.run_id)
    with pytest.raises(mlflow_ckpt.CheckpointError, match="model_factory="):
        mlflow_ckpt.load_model(ckpt)


def test_save_model_and_load_model_follow_mlflow_conventions(tmp_path, tracking: str) -> None:
    from mlflow_ckpt import flavor

    torch.manual_seed(1)
    model = Net()
    path = tmp_path / "saved"
    flavor.save_model(model, path, model_factory="tests.train_script:Net")
    assert (path / "MLmodel").exists() and (path / "manifest.json").exists()
    with pytest.raises(mlflow_ckpt.CheckpointError, match="already exists"):
        flavor.save_model(model, path)
    batch = np.ones((2, DIM), dtype=np.float32)
    model.eval()
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    np.testing.assert_array_equal(mlflow.pyfunc.load_model(str(path)).predict(batch), expected)
    rebuilt = flavor.load_model(path)
    with torch.no_grad():
        np.testing.assert_array_equal(rebuilt(torch.from_numpy(batch)).numpy(), expected)

    with mlflow.start_run(run_name="log"):
        ckpt = flavor.log_model(model, step=3, metrics={"acc": 0.5}, model_factory=Net)
    assert ckpt.step == 3 and ckpt.metrics == {"acc": 0.5} and ckpt.triggers == ("manual",)
    assert mlflow_ckpt.list_checkpoints(ckpt.run_id) == [ckpt]
    with torch.no_grad():
        np.testing.assert_array_equal(
            flavor.load_model(ckpt.uri)(torch.from_numpy(batch)).numpy(), expected
        )


def test_code_paths_make_the_factory_importable_elsewhere(
    tmp_path, tracking: str, run_child
) -> None:
    pkg = tmp_path / "src" / "mynets"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "import torch\n"
        "def build(width):\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.Linear(width, 1))\n"
    )
    import sys

    sys.path.insert(0, str(pkg.parent))
    try:
        import mynets

        model = mynets.build(5)
        with mlflow.start_run(run_name="code") as run:
            with mlflow_ckpt.CheckpointManager(
                {"model": model},
                model_factory="mynets:build",
                model_kwargs={"width": 5},
                code_paths=[str(pkg)],
                async_save=False,
            ) as mgr:
                mgr.save(0)
    finally:
        sys.path.remove(str(pkg.parent))
        sys.modules.pop("mynets", None)
    uri = mlflow_ckpt.latest_checkpoint(run.info.run_id).uri
    script = tmp_path / "serve_elsewhere.py"
    script.write_text(
        "import sys, mlflow, numpy as np\n"
        f"m = mlflow.pyfunc.load_model({uri!r})\n"
        "print(m.predict(np.ones((2, 3), dtype=np.float32)).shape)\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        out = run_child("serve_elsewhere")
    finally:
        sys.path.remove(str(tmp_path))
    assert out.stdout.strip().endswith("(2, 1)")


_MODEL_CODE = """
import torch


class Tiny(torch.nn.Module):
    def __init__(self, features: int = 4) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(features, 2)

    def forward(self, x):
        return self.lin(x)
"""


def test_a_checkpoint_carries_its_model_code_where_it_is_not_installed(
    tracking: str, tmp_path: Path
) -> None:
    """code_paths=: load_model, the flavor, pyfunc and the CLI's export need no PYTHONPATH."""
    name = f"ckpt_code_{uuid.uuid4().hex[:8]}"
    source = tmp_path / "src"
    source.mkdir()
    (source / f"{name}.py").write_text(_MODEL_CODE)
    sys.path.insert(0, str(source))
    try:
        factory = importlib.import_module(name).Tiny
        model = factory(features=4)
        with mlflow.start_run(run_name="code") as run:
            with mlflow_ckpt.CheckpointManager(
                {"model": model},
                model_factory=factory,
                model_kwargs={"features": 4},
                code_paths=[source / f"{name}.py"],
                async_save=False,
            ) as mgr:
                mgr.save(0)
    finally:
        sys.path.remove(str(source))
        del sys.modules[name]
    shutil.rmtree(source)  # the model's code now exists only inside the checkpoint
    ckpt = mlflow_ckpt.latest_checkpoint(run.info.run_id)
    batch = torch.ones(3, 4)
    with torch.no_grad():
        expected = model(batch)
    added: list[str] = []
    try:
        rebuilt = mlflow_ckpt.load_model(ckpt.uri)
        added = [p for p in sys.path if "mlflow-ckpt-code-" in p]
        assert len(added) == 1 and Path(added[0], f"{name}.py").is_file()
        with torch.no_grad():
            assert torch.equal(rebuilt(batch), expected)
        assert type(mlflow_ckpt.flavor.load_model(ckpt.uri)).__name__ == "Tiny"
        assert [p for p in sys.path if "mlflow-ckpt-code-" in p] == added  # one entry, reused
        served = mlflow.pyfunc.load_model(ckpt.uri).predict(batch.numpy())
        np.testing.assert_allclose(served, expected.numpy())
        out = tmp_path / "model.onnx"
        result = CliRunner().invoke(
            cli,
            ["export", ckpt.uri, "--format", "onnx", "--example-shape", "1,4", "-o", str(out)],
        )
        assert result.exit_code == 0, result.output
        assert out.stat().st_size > 0
    finally:
        for path in added:
            sys.path.remove(path)
        sys.modules.pop(name, None)


@pytest.mark.parametrize("wrap", ["compile", "data_parallel"])
def test_wrapped_models_are_stored_keyed_like_the_plain_model(tracking: str, wrap: str) -> None:
    """A torch.compile'd (or DataParallel) model's checkpoint loads into the plain model,
    serves through pyfunc (whose factory builds a plain one) and resumes into a wrapper."""
    torch.manual_seed(0)
    plain = Net()
    wrapped = (
        torch.compile(plain, backend="eager") if wrap == "compile" else torch.nn.DataParallel(plain)
    )
    prefix = "_orig_mod." if wrap == "compile" else "module."
    assert all(k.startswith(prefix) for k in wrapped.state_dict())
    opt = torch.optim.AdamW(wrapped.parameters(), lr=0.01)
    batch = torch.randn(4, DIM)
    with mlflow.start_run(run_name=wrap) as run:
        with mlflow_ckpt.CheckpointManager(
            {"model": wrapped, "optimizer": opt}, model_factory=Net, async_save=False
        ) as mgr:
            wrapped(batch).sum().backward()
            opt.step()
            mgr.save(0)
    ckpt = mlflow_ckpt.latest_checkpoint(run.info.run_id)
    saved = mlflow_ckpt.load_training_state(ckpt)["model"]
    assert list(saved) == list(plain.state_dict())  # no wrapper prefix
    fresh = Net()
    mlflow_ckpt.load(ckpt, {"model": fresh})
    for key, value in plain.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    with torch.no_grad():
        expected = plain.eval()(batch).numpy()
    np.testing.assert_array_equal(
        mlflow.pyfunc.load_model(ckpt.uri).predict(batch.numpy()), expected
    )

    # and back into a wrapped model, optimizer included
    again = Net()
    rewrapped = torch.compile(again, backend="eager") if wrap == "compile" else again
    opt2 = torch.optim.AdamW(rewrapped.parameters(), lr=0.01)
    resumed = mlflow_ckpt.CheckpointManager.resume(
        run.info.run_id, {"model": rewrapped, "optimizer": opt2}
    )
    resumed.close()
    mlflow.end_run()
    for key, value in plain.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    assert opt2.state_dict()["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])


def test_checkpoints_with_wrapper_prefixed_keys_still_restore(tracking: str) -> None:
    """Written before wrappers were unwrapped: ``_orig_mod.``-prefixed keys."""
    torch.manual_seed(0)
    plain = Net()

    class AsCompiledBefore:  # what a compiled model's state_dict() gave
        def state_dict(self) -> dict[str, torch.Tensor]:
            return {f"_orig_mod.{k}": v for k, v in plain.state_dict().items()}

        def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
            raise AssertionError("not restored into")

    with mlflow.start_run(run_name="old") as run:
        with mlflow_ckpt.CheckpointManager({"model": AsCompiledBefore()}, async_save=False) as mgr:
            mgr.save(0)
    fresh = Net()
    mlflow_ckpt.load(mlflow_ckpt.latest_checkpoint(run.info.run_id), {"model": fresh})
    for key, value in plain.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_a_model_whose_child_is_named_module_keeps_its_keys(tracking: str) -> None:
    """An EMA-style wrapper (one child called ``module``) is not a DataParallel."""

    class Ema(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = Net()

    torch.manual_seed(0)
    ema = Ema()
    with mlflow.start_run(run_name="ema") as run:
        with mlflow_ckpt.CheckpointManager({"ema": ema}, async_save=False) as mgr:
            mgr.save(0)
    fresh = Ema()
    resumed = mlflow_ckpt.CheckpointManager.resume(run.info.run_id, {"ema": fresh})
    resumed.close()
    mlflow.end_run()
    for key, value in ema.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key

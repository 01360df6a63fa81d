"""Incremental checkpoints of a fine-tune: bytes each save adds, and what a save costs.

A frozen backbone (``--backbone-mb`` of fp32 weights, ``requires_grad=False``) under a
small trainable head with AdamW: the backbone is >= 90% of the checkpoint's bytes. The
same training is saved ``--saves`` times with ``incremental=True`` (the default) and with
``incremental=False``, sync and async, into a local store with sqlite tracking. Reported:

* bytes each checkpoint added, read from the store's listing (its folder plus the shared
  group it wrote), and the later ones as a fraction of the first (target <= 0.12);
* the median time of a later sync save, and of the training stall of a later async save,
  against the same figure with ``incremental=False``: both runs train side by side and
  save in interleaved pairs, the ratio the median of the per-pair ratios (min-max);
* ``CheckpointManager.resume`` of the incremental run into a fresh model (it compares the
  frozen backbone it restored with the checkpoint's bytes once), and the first save (stall)
  after it: the backbone holds the checkpoint's bytes, so it is referenced unread.

    python benchmarks/incremental.py [--backbone-mb 400] [--saves 6]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path.cwd()))  # the checkout under test (its mlflow_ckpt)

import mlflow
import torch
from mlflow import MlflowClient

import mlflow_ckpt
from mlflow_ckpt.catalog.shared import shared_area_uri
from mlflow_ckpt.storage import open_store

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pairs import PairResult

WIDTH = 4096


class FineTune(torch.nn.Module):
    def __init__(self, layers: int) -> None:
        super().__init__()
        self.backbone = torch.nn.Sequential(*(torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers)))
        self.backbone.requires_grad_(False)
        self.head = torch.nn.Linear(WIDTH, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def added_bytes(ckpt: mlflow_ckpt.Checkpoint, area: str) -> int:
    """What a checkpoint added to the store, from the store's listing."""
    own = open_store(ckpt.artifact_location).list_sizes("")
    shared = open_store(area).list_sizes(ckpt.model_id)
    return sum(v for k, v in own.items() if k != "manifest.json") + sum(shared.values())


def fine_tune(layers: int, seed: int) -> tuple[FineTune, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = FineTune(layers)
    return model, torch.optim.AdamW(model.head.parameters(), lr=1e-3)


def train_step(model: FineTune, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def both(layers: int, saves: int, *, async_save: bool) -> dict[bool, dict[str, object]]:
    """The same fine-tune twice at once (``incremental=True`` and ``False``, each its own
    model, optimizer and run, the second nested), saved in interleaved pairs: at each step
    both train, then both save back to back, the order alternating (``benchmarks/pairs.py``:
    the disk here swings ~3x between runs minutes apart, so only ratios within a pair are
    evidence)."""
    x = torch.randn(16, WIDTH)
    arms = {}
    with contextlib.ExitStack() as stack:
        for incremental in (True, False):
            run = stack.enter_context(
                mlflow.start_run(run_name=f"inc-{incremental}-{async_save}", nested=not incremental)
            )
            model, opt = fine_tune(layers, seed=0)
            mgr = stack.enter_context(
                mlflow_ckpt.CheckpointManager(
                    {"model": model, "optimizer": opt},
                    incremental=incremental,
                    async_save=async_save,
                    timeline=False,
                    save_last=False,
                )
            )
            arms[incremental] = (run, model, opt, mgr, [])
        for step in range(saves):
            order = (True, False) if step % 2 == 0 else (False, True)
            for incremental in order:
                _, model, opt, mgr, times = arms[incremental]
                train_step(model, opt, x)
                for _, _, _, other, _ in arms.values():
                    other.wait()  # time the save (or the stall) alone, not a previous one
                started = time.perf_counter()
                mgr.save(step)
                times.append(time.perf_counter() - started)
    out = {}
    for incremental, (run, _, _, _, times) in arms.items():
        area = shared_area_uri(MlflowClient().get_run(run.info.run_id).info.artifact_uri)
        ckpts = sorted(mlflow_ckpt.list_checkpoints(run.info.run_id), key=lambda c: c.step)
        out[incremental] = {
            "added": [added_bytes(c, area) for c in ckpts],
            "tagged": [c.stored_bytes for c in ckpts],
            "size": ckpts[0].size_bytes,
            "times": times,
            "later_s": statistics.median(times[1:]),
            "first_s": times[0],
            "run_id": run.info.run_id,
            "area": area,
        }
    return out


def after_resume(
    run_id: str, layers: int, area: str, *, async_save: bool
) -> tuple[float, float, int]:
    """Resume ``run_id`` into a new model, train one step, time the resume and the first
    save (or stall); return both and the bytes that save added."""
    model, opt = fine_tune(layers, seed=1)
    started = time.perf_counter()
    resumed = mlflow_ckpt.CheckpointManager.resume(
        run_id,
        {"model": model, "optimizer": opt},
        async_save=async_save,
        timeline=False,
        save_last=False,
    )
    resume_s = time.perf_counter() - started
    with resumed as mgr:
        train_step(model, opt, torch.randn(16, WIDTH))
        started = time.perf_counter()
        mgr.save(mgr.start_step)
        took = time.perf_counter() - started
    mlflow.end_run()  # (resume reopened the run)
    newest = mlflow_ckpt.latest_checkpoint(run_id)
    assert newest is not None and newest.step == mgr.start_step
    return resume_s, took, added_bytes(newest, area)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone-mb", type=int, default=400)
    parser.add_argument("--saves", type=int, default=6)
    args = parser.parse_args(argv)
    layers = max(1, round(args.backbone_mb * 1e6 / ((WIDTH * WIDTH + WIDTH) * 4)))
    work = Path(tempfile.mkdtemp(prefix="mlflow-ckpt-incremental-"))
    cwd = os.getcwd()
    os.chdir(work)
    try:
        report(layers, args.saves, work)
    finally:
        os.chdir(cwd)
        shutil.rmtree(work, ignore_errors=True)  # several GB of checkpoints


def report(layers: int, saves: int, work: Path) -> None:
    """Run the fine-tune every way in ``work`` and print the figures."""
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    mlflow.set_experiment("incremental")
    results = {}
    for mode in ("sync", "async"):
        for inc, figures in both(layers, saves, async_save=mode == "async").items():
            results[(inc, mode)] = figures
    frozen = layers * (WIDTH * WIDTH + WIDTH) * 4
    size = results[(True, "sync")]["size"]
    assert isinstance(size, int)
    print(
        f"state: {size / 1e6:.0f} MB, frozen backbone {frozen / 1e6:.0f} MB ({frozen / size:.1%})"
    )
    for mode in ("sync", "async"):
        inc, full = results[(True, mode)], results[(False, mode)]
        added = inc["added"]
        assert isinstance(added, list) and added == inc["tagged"], (added, inc["tagged"])
        later = max(added[1:]) / added[0]
        label = "save" if mode == "sync" else "stall"
        print(
            f"{mode:>5}: first checkpoint added {added[0] / 1e6:.1f} MB, later ones "
            f"{', '.join(f'{a / 1e6:.1f}' for a in added[1:])} MB: at most {later:.3f}x the "
            f"first (target <= 0.12); incremental=False adds "
            f"{statistics.median(full['added']) / 1e6:.1f} MB each"  # type: ignore[arg-type]
        )
        pairs = PairResult(tuple(inc["times"][1:]), tuple(full["times"][1:]))  # type: ignore[index]
        ratio = f"{pairs.median_ratio:.2f}x ({pairs.min:.2f}-{pairs.max:.2f}) in pairs"
        print(
            f"       later {label}: {float(inc['later_s']):.3f} s vs {float(full['later_s']):.3f} s"  # type: ignore[arg-type]
            f" with incremental=False ({ratio}); first {label} "
            f"{float(inc['first_s']):.3f} s vs {float(full['first_s']):.3f} s"  # type: ignore[arg-type]
        )
        resume_s, took, resumed_added = after_resume(
            str(inc["run_id"]), layers, str(inc["area"]), async_save=mode == "async"
        )
        print(
            f"       resume {resume_s:.3f} s; first {label} after it: {took:.3f} s, added "
            f"{resumed_added / 1e6:.1f} MB ({resumed_added / added[0]:.3f}x the first)"
        )


if __name__ == "__main__":
    main(sys.argv[1:])

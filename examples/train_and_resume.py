"""Train with checkpoints, get killed mid-run (SIGKILL), resume by run ID, finish.

    python examples/train_and_resume.py            # what `make demo` runs

The parent process starts a training child, kills it with SIGKILL once a few checkpoints are
committed, then starts a second child that continues the *same* MLflow run with
``CheckpointManager.resume(run_id, ...)``. Everything lands in MLflow's embedded default
store, ``sqlite:///mlflow.db`` (artifacts under ``./mlruns``).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import mlflow
import torch

import mlflow_ckpt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from demo_model import Classifier, synthetic_batch

TOTAL_STEPS = 300
STEPS_PER_EPOCH = 50
KILL_AFTER_STEP = 140
EXPERIMENT = "mlflow-ckpt-demo"


def build_state() -> dict[str, object]:
    torch.manual_seed(0)
    model = Classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=TOTAL_STEPS)
    data = torch.Generator().manual_seed(42)  # the data position is part of the state
    return {"model": model, "optimizer": opt, "scheduler": sched, "data": data}


def train(run_id: str | None) -> None:
    """Child process: train (fresh, or resumed from ``run_id``), printing each commit."""
    state = build_state()
    options = dict(
        save_every_n_steps=25,
        monitor="val_loss",
        mode="min",
        model_factory=Classifier,
        model_kwargs={"features": 20, "hidden": 64, "classes": 4},
        # the model's code travels with each checkpoint: it serves and exports from anywhere
        code_paths=[os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_model.py")],
        spike_factor=3.0,  # pin the checkpoint before a val_loss spike (retention keeps it)
    )
    if run_id is None:
        mlflow.set_experiment(EXPERIMENT)
        mlflow.start_run(run_name="demo-classifier")
        manager = mlflow_ckpt.CheckpointManager(state, **options)
        print(f"RUN_ID={mlflow.active_run().info.run_id}", flush=True)
    else:
        manager = mlflow_ckpt.CheckpointManager.resume(run_id, state, **options)
        print(f"resumed from step {manager.start_step - 1}, continuing", flush=True)
    model, opt, sched, data = state["model"], state["optimizer"], state["scheduler"], state["data"]
    val_x, val_y = synthetic_batch(torch.Generator().manual_seed(7), 512)
    for step in range(manager.start_step, TOTAL_STEPS):
        model.train()
        x, y = synthetic_batch(data)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        metrics = {"train_loss": loss.item(), "lr": sched.get_last_lr()[0]}
        if (step + 1) % 10 == 0:
            model.eval()
            with torch.no_grad():
                metrics["val_loss"] = torch.nn.functional.cross_entropy(model(val_x), val_y).item()
        epoch = step // STEPS_PER_EPOCH
        manager.step(step, metrics, epoch=epoch, end_of_epoch=(step + 1) % STEPS_PER_EPOCH == 0)
        print(f"step {step}", flush=True)
        time.sleep(0.01)  # stand-in for real work, so the kill lands mid-run
    manager.close()
    mlflow.end_run()


def run_child(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, bufsize=1
    )


def main() -> None:
    uri = mlflow.get_tracking_uri()
    print(f"Tracking store: {uri}")
    print(
        f"1) training {TOTAL_STEPS} steps in a child process, to be killed after step "
        f"{KILL_AFTER_STEP}..."
    )
    child = run_child("--child")
    run_id = None
    assert child.stdout is not None
    for line in child.stdout:
        if line.startswith("RUN_ID="):
            run_id = line.strip().split("=", 1)[1]
            print(f"   run ID {run_id}")
        elif line.startswith("step ") and int(line.split()[1]) >= KILL_AFTER_STEP:
            child.send_signal(signal.SIGKILL)
            break
    child.wait()
    if run_id is None:
        raise SystemExit("the training child never started a run")
    print(f"   killed with SIGKILL (exit status {child.returncode})")
    before = mlflow_ckpt.list_checkpoints(run_id)
    print(f"   committed checkpoints so far: steps {[c.step for c in before]}")

    print(f"2) resuming run {run_id} in a new process...")
    resumed = run_child("--child", "--resume", run_id)
    assert resumed.stdout is not None
    for line in resumed.stdout:
        if not line.startswith("step "):
            print(f"   {line.strip()}")
    if resumed.wait() != 0:
        raise SystemExit("the resumed child failed")

    ckpts = mlflow_ckpt.list_checkpoints(run_id)
    print(f"3) run {run_id} finished with {len(ckpts)} checkpoints:")
    print(f"   {'step':>5} {'epoch':>5} {'trigger':<16} {'val_loss':>9} {'size':>9}  uri")
    for c in ckpts:
        val = c.metrics.get("val_loss")
        print(
            f"   {c.step:>5} {c.epoch!s:>5} {','.join(c.triggers):<16} "
            f"{'' if val is None else f'{val:.4f}':>9} {c.size_bytes / 1024:>7.1f}KB  {c.uri}"
        )
    best = mlflow_ckpt.best_checkpoint(run_id=run_id, metric="val_loss", mode="min")
    if best is not None:
        print(f"   best val_loss {best.metrics['val_loss']:.4f} at step {best.step}: {best.uri}")
        print("\nServe or export the best one (its model code is inside the checkpoint):")
        print(f"   mlflow models serve -m {best.uri} --env-manager local")
        print(f"   mlflow-ckpt export {best.uri} --format onnx --example-shape 1,20 -o best.onnx")
    print("\nA picture of the run's checkpoints (also logged as the run artifact")
    print("mlflow_ckpt/timeline.png):")
    print(f"   mlflow-ckpt plot {run_id} -o timeline.png")
    experiment_id = mlflow.get_experiment_by_name(EXPERIMENT).experiment_id
    print_ui_hint(uri, experiment_id)


def print_ui_hint(tracking_uri: str, experiment_id: str) -> None:
    """Where to look: the experiment's Models tab in the 'Model training' view."""
    print("\nLook at them in the MLflow UI:")
    print(f"   mlflow ui --backend-store-uri {tracking_uri}")
    print(
        f"   http://127.0.0.1:5000/#/experiments/{experiment_id}/models"
        "?workflowType=machine_learning"
    )
    print("   (the Models tab of the experiment, 'Model training' view: one row per checkpoint,")
    print("    with its step, epoch and trigger as parameters and its metrics as columns)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--resume", metavar="RUN_ID", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if args.child:
        train(args.resume)
    else:
        main()

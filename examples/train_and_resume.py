"""Train with checkpoints, get killed (SIGKILL), then preempted (SIGTERM); the identical
command continues the same MLflow run each time.

    python examples/train_and_resume.py            # what `make demo` runs

The parent plays the scheduler of a preemptible job: it starts the training command, SIGKILLs
it once a few checkpoints are committed, starts the *identical* command again (no run ID is
passed: ``resume="auto"`` finds the job's run by its key, here ``MLFLOW_CKPT_RUN_KEY``, as it
would by ``SLURM_JOB_ID`` or torchrun's ``TORCHELASTIC_RUN_ID``), sends that one SIGTERM (a
preemption notice: it saves the step it is at and exits), and starts the command a third
time to finish. Everything lands in MLflow's embedded default store,
``sqlite:///mlflow.db`` (artifacts under ``./mlruns``).
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
PREEMPT_AFTER_STEP = 212
EXPERIMENT = "mlflow-ckpt-demo"


def build_state() -> dict[str, object]:
    torch.manual_seed(0)
    model = Classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=TOTAL_STEPS)
    data = torch.Generator().manual_seed(42)  # the data position is part of the state
    return {"model": model, "optimizer": opt, "scheduler": sched, "data": data}


def train() -> None:
    """Child process: the training command, the same every time it is started."""
    state = build_state()
    mlflow.set_experiment(EXPERIMENT)
    manager = mlflow_ckpt.CheckpointManager(
        state,
        resume="auto",  # this job's run (key: MLFLOW_CKPT_RUN_KEY), resumed where it stopped
        save_every_n_steps=25,
        monitor="val_loss",
        mode="min",
        model_factory=Classifier,
        model_kwargs={"features": 20, "hidden": 64, "classes": 4},
        # the model's code travels with each checkpoint: it serves and exports from anywhere
        code_paths=[os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_model.py")],
        spike_factor=3.0,  # pin the checkpoint before a val_loss spike (retention keeps it)
    )  # with resume="auto", SIGTERM saves the current step before the process ends
    print(f"RUN_ID={manager.run_id}", flush=True)
    if manager.resumed_from is not None:
        print(f"resumed from step {manager.resumed_from.step}, continuing", flush=True)
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


def run_child(env: dict[str, str]) -> subprocess.Popen[str]:
    """The training command; the same argv and environment every time (as a scheduler's)."""
    return subprocess.Popen(
        [sys.executable, __file__, "--child"], stdout=subprocess.PIPE, text=True, bufsize=1, env=env
    )


def run_until(child: subprocess.Popen[str], stop_after: int | None, sig: int) -> str | None:
    """Echo the child's own lines; send ``sig`` once it has finished step ``stop_after``."""
    assert child.stdout is not None
    run_id = None
    for line in child.stdout:
        if line.startswith("RUN_ID="):
            run_id = line.strip().split("=", 1)[1]
        elif not line.startswith("step "):
            print(f"   {line.strip()}")
        elif stop_after is not None and int(line.split()[1]) >= stop_after:
            child.send_signal(sig)
            break
    child.wait()
    return run_id


def main() -> None:
    uri = mlflow.get_tracking_uri()
    print(f"Tracking store: {uri}")
    # The job's identity, as a scheduler would set SLURM_JOB_ID: the same for each restart.
    env = dict(os.environ, MLFLOW_CKPT_RUN_KEY=f"demo-{time.strftime('%Y%m%d-%H%M%S')}")
    print(f"1) training {TOTAL_STEPS} steps (job {env['MLFLOW_CKPT_RUN_KEY']}), to be killed...")
    child = run_child(env)
    run_id = run_until(child, KILL_AFTER_STEP, signal.SIGKILL)
    if run_id is None:
        raise SystemExit("the training child never started a run")
    print(f"   run {run_id} killed with SIGKILL (exit status {child.returncode})")
    before = mlflow_ckpt.list_checkpoints(run_id)
    print(f"   committed checkpoints so far: steps {[c.step for c in before]}")

    print("2) the identical command again (no run ID given); preempted with SIGTERM...")
    child = run_child(env)
    assert run_until(child, PREEMPT_AFTER_STEP, signal.SIGTERM) == run_id
    saved = mlflow_ckpt.latest_checkpoint(run_id)
    print(
        f"   SIGTERM: exit status {child.returncode}, after saving step {saved.step} "
        f"(trigger {','.join(saved.triggers)})"
    )

    print("3) the identical command once more, to the end...")
    child = run_child(env)
    run_until(child, None, signal.SIGTERM)
    if child.returncode != 0:
        raise SystemExit("the resumed child failed")

    ckpts = mlflow_ckpt.list_checkpoints(run_id)
    print(f"4) run {run_id} finished with {len(ckpts)} checkpoints:")
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
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if args.child:
        train()
    else:
        main()

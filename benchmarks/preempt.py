"""How long a preempted job takes to go: SIGTERM -> checkpoint of that step committed -> exit.

A training process holds the suite's state (``--params`` million parameters + AdamW, ~12
bytes each: 600 MB by default, every tensor changed at each step as training does) under
``CheckpointManager(resume="auto")`` (SIGTERM watched; periodic saves far apart, so the
emergency save writes everything). Once it trains, the parent sends SIGTERM at a random
moment and times until the process is gone (``waitpid``); the child's own log says how long
the save took. Then the run's newest checkpoint must be the signalled step (trigger
``preempted``) and verify. ``--repeats`` times per store: local disk (sqlite + local
artifacts) and S3 (a moto server on 127.0.0.1). The figures are set against the grace
periods schedulers give between SIGTERM and SIGKILL.

    python benchmarks/preempt.py [--params 50] [--repeats 3] [--stores local s3]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

GRACE = (
    ("Kubernetes terminationGracePeriodSeconds (default)", 30),
    ("SLURM KillWait (default)", 30),
    ("torchrun agent before SIGKILL (TORCH_ELASTIC_SHUTDOWN_TIMEOUT)", 30),
    ("GCP spot / preemptible VM notice", 30),
    ("AWS spot interruption notice", 120),
)
SAVED = re.compile(r"SIGTERM: saved step (\d+) of run (\w+) \(trigger preempted\) in ([\d.]+)s")


def child(params: int) -> None:
    """The training process: steps forever until SIGTERM ends it."""
    from stall import build, touch

    import mlflow_ckpt

    model, opt = build(params)
    manager = mlflow_ckpt.CheckpointManager(
        {"model": model, "optimizer": opt},
        resume="auto",  # key: MLFLOW_CKPT_RUN_KEY; SIGTERM watched
        save_every_n_steps=1_000_000,
        timeline=False,
    )
    for step in range(manager.start_step, 1_000_000):
        touch(model, opt)  # a training step changes every weight and moment
        time.sleep(0.05)
        manager.step(step, {"loss": 1.0 / (step + 1)})
        if step == manager.start_step + 2:
            print("training", flush=True)


def trial(env: dict[str, str], params: int, rng: random.Random) -> tuple[float, float]:
    """One child SIGTERMed at a random moment: (SIGTERM -> exit s, the save's own s)."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", "--params", str(params)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "training":
        raise SystemExit(f"the child did not start: {proc.communicate()[1][-2000:]}")
    time.sleep(rng.uniform(0.1, 1.0))
    start = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    elapsed = time.perf_counter() - start
    found = SAVED.search(err)
    if proc.returncode != -signal.SIGTERM or found is None:
        raise SystemExit(f"exit status {proc.returncode}, no emergency save logged:\n{err[-2000:]}")
    _check(found.group(2), int(found.group(1)))
    return elapsed, float(found.group(3))


def _check(run_id: str, step: int) -> None:
    """The run's newest checkpoint is the signalled step, and every file of it verifies."""
    from mlflow import MlflowClient

    import mlflow_ckpt
    from mlflow_ckpt.catalog import resolve
    from mlflow_ckpt.catalog.reader import verify_checkpoint

    newest = mlflow_ckpt.latest_checkpoint(run_id)
    if newest is None or newest.step != step or "preempted" not in newest.triggers:
        raise SystemExit(f"run {run_id}: newest checkpoint {newest}, expected step {step}")
    problems = verify_checkpoint(resolve(newest, MlflowClient()))
    if problems:
        raise SystemExit(f"{newest.uri} does not verify: {problems}")


def measure(store: str, args: argparse.Namespace, work: Path) -> tuple[list[float], list[float]]:
    import boto3
    import mlflow

    from tests import servers

    folder = work / store
    folder.mkdir()
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, OMP_NUM_THREADS=str(os.cpu_count() or 1))
    server = None
    if store == "s3":
        server = servers.start_s3()
        env.update(servers.AWS_ENV, MLFLOW_S3_ENDPOINT_URL=server.url)
        os.environ.update(servers.AWS_ENV, MLFLOW_S3_ENDPOINT_URL=server.url)  # (to verify)
        boto3.client("s3", endpoint_url=server.url).create_bucket(Bucket="bench")
        location = "s3://bench/preempt"
    else:
        location = str(folder / "artifacts")
    try:
        env["MLFLOW_EXPERIMENT_ID"] = mlflow.create_experiment("preempt", location)
        rng = random.Random(args.seed)
        exits, saves = [], []
        for i in range(args.repeats):
            env["MLFLOW_CKPT_RUN_KEY"] = f"preempt-{store}-{i}"
            elapsed, saved = trial(env, args.params, rng)
            exits.append(elapsed)
            saves.append(saved)
            print(f"  {store} #{i + 1}: SIGTERM -> exit {elapsed:.2f} s (save {saved:.1f} s)")
        return exits, saves
    finally:
        if server is not None:
            server.stop()
        mlflow.set_tracking_uri(None)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stores", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.params)
        return
    from stall import build, state_bytes

    size = state_bytes(*build(args.params))
    work = Path(tempfile.mkdtemp(prefix="mlflow-ckpt-preempt-"))
    rows = {}
    try:
        for store in args.stores:
            rows[store] = measure(store, args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"\nstate {size / 1e6:.0f} MB (model + AdamW), {os.cpu_count()} CPUs, sync emergency save"
    )
    print("| store | SIGTERM -> exit, s (min / median / max) | the save itself, s (median) |")
    print("|---|---|---|")
    for store, (exits, saves) in rows.items():
        print(
            f"| {store} | {min(exits):.2f} / {statistics.median(exits):.2f} / {max(exits):.2f} "
            f"| {statistics.median(saves):.1f} |"
        )
    worst = max(max(exits) for exits, _ in rows.values())
    print("\nagainst the grace periods between SIGTERM and SIGKILL:")
    for what, seconds in GRACE:
        print(f"  {what}: {seconds} s -> worst case here uses {worst / seconds:.0%} of it")


if __name__ == "__main__":
    main(sys.argv[1:])

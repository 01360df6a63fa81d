"""A checkpoint saved straight to S3: time, and bytes that touched local disk on the way.

Starts a real S3 server (moto) on 127.0.0.1 and saves a model + AdamW state (``--params``
million parameters, ~12 bytes each) with ``CheckpointManager`` to ``s3://bench/...``,
``--repeats`` times, sync. The process's temp dir is a fresh folder, watched every 2 ms
while the saves run: the peak of bytes in it and every name that appeared there are
reported (a save that stages its files locally shows them; one that writes from memory
shows nothing).

    python benchmarks/remote_save.py [--params 50] [--repeats 3] [--load]

``--load`` adds a load comparison: the same state saved once plain and once with
``compression="zstd"``, each loaded back from S3 ``--repeats`` times (``mlflow_ckpt.load``
into the live objects, every file hashed). Over a network the bytes not sent count; from a
local page cache (``benchmarks/suite.py``) only the decoding does.

Run it from another checkout (``git worktree``) to compare with an older version: it only
uses the public API.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path.cwd()))  # the checkout under test (its mlflow_ckpt)
sys.path.append(str(Path(__file__).resolve().parent.parent))  # this checkout's test servers
sys.path.append(str(Path(__file__).resolve().parent))

import boto3
import mlflow

import mlflow_ckpt
from mlflow_ckpt.storage import TransferConfig
from tests import servers


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--part-mb", type=int, help="TransferConfig.part_bytes, in MiB")
    parser.add_argument("--workers", type=int, default=4, help="TransferConfig.max_workers")
    parser.add_argument("--shard-mb", type=int, default=512, help="max_shard_bytes, in MiB")
    parser.add_argument("--load", action="store_true", help="compressed vs plain load from S3")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mlflow-ckpt-remote-"))
    spool = work / "tmp"
    spool.mkdir()
    server = servers.start_s3()
    try:
        env = dict(servers.AWS_ENV, MLFLOW_S3_ENDPOINT_URL=server.url)
        os.environ.update(env, AWS_ENDPOINT_URL_S3=server.url, TMPDIR=str(spool))
        tempfile.tempdir = str(spool)
        boto3.client("s3", endpoint_url=server.url).create_bucket(Bucket="bench")
        mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
        run(args, spool)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, spool: Path) -> None:
    from stall import build, state_bytes, touch  # after mlflow_ckpt: it puts this checkout first

    exp = mlflow.create_experiment("remote", artifact_location="s3://bench/remote")
    mlflow.set_experiment(experiment_id=exp)
    model, opt = build(args.params)
    size = state_bytes(model, opt)
    peak, seen, done = [0], set(), threading.Event()

    def watch() -> None:
        while not done.is_set():
            used = 0
            with contextlib.suppress(FileNotFoundError):
                for p in spool.rglob("*"):
                    seen.add(p.name.split("-")[0] if p.is_dir() else p.name)
                    used += p.stat().st_size if p.is_file() else 0
            peak[0] = max(peak[0], used)
            time.sleep(0.002)

    times = []
    transfer = {"max_workers": args.workers}
    if args.part_mb:  # newer versions only
        transfer["part_bytes"] = args.part_mb * 1024 * 1024
    with mlflow.start_run(run_name="remote"):
        mgr = mlflow_ckpt.CheckpointManager(
            {"model": model, "optimizer": opt},
            async_save=False,
            keep_last_n=1,
            timeline=False,
            max_shard_bytes=args.shard_mb * 1024 * 1024,
            transfer=TransferConfig(**transfer),
        )
        mgr.save(0)  # warm-up: clients, connections, the bucket
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        for step in range(1, args.repeats + 1):
            touch(model, opt)  # as training does: an incremental save then writes it all
            start = time.perf_counter()
            mgr.save(step)
            times.append(time.perf_counter() - start)
        done.set()
        watcher.join()
        mgr.close()
    print(
        f"state {size / 1e6:.0f} MB to S3 (moto on 127.0.0.1), {os.cpu_count()} CPUs, "
        f"mlflow_ckpt from {Path(mlflow_ckpt.__file__).parent.parent}"
    )
    print(
        f"sync save to S3, seconds (min / median / max of {len(times)}): "
        f"{min(times):.2f} / {statistics.median(times):.2f} / {max(times):.2f}"
    )
    print(f"peak bytes in the temp dir during the saves: {peak[0]}; names seen: {sorted(seen)}")
    if args.load:
        compare_loads({"model": model, "optimizer": opt}, args.repeats)


def compare_loads(state: dict[str, object], repeats: int) -> None:
    """Load the same state from S3, saved plain and compressed (``compression="zstd"``)."""
    medians = {}
    for compression in (None, "zstd"):
        with mlflow.start_run(run_name=f"load-{compression}") as run:
            mgr = mlflow_ckpt.CheckpointManager(
                state, async_save=False, timeline=False, compression=compression
            )
            mgr.save(0)
            mgr.close()
        ckpt = mlflow_ckpt.latest_checkpoint(run.info.run_id)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            mlflow_ckpt.load(ckpt.uri, state)
            times.append(time.perf_counter() - start)
        medians[compression] = statistics.median(times)
        print(
            f"load from S3, compression={compression!r}: {ckpt.stored_bytes / 1e6:.0f} MB "
            f"stored, seconds (min / median / max of {repeats}): "
            f"{min(times):.2f} / {medians[compression]:.2f} / {max(times):.2f}"
        )
    print(f"compressed load / plain load (medians): {medians['zstd'] / medians[None]:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])

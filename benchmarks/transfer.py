"""Upload and download throughput of a ~500 MB checkpoint to an S3 server, ours vs MLflow's.

Starts a real S3 server (moto) on 127.0.0.1, then in the same process:

* upload: mlflow_ckpt's upload of a checkpoint's files from memory (each file in parts of
  ``TransferConfig.part_bytes`` or one PUT, a bounded pool) vs ``mlflow.log_artifacts`` of
  the same files (one file at a time);
* download: mlflow_ckpt's parallel fetch + hash verification (BLAKE3) vs
  ``mlflow.artifacts.download_artifacts`` (no verification).

    python benchmarks/transfer.py [--mb 512] [--shard-mb 64] [--workers 4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import boto3
import mlflow
import torch

from mlflow_ckpt.codec import read_manifest, verify_files
from mlflow_ckpt.folder import FolderSpec, write_folder
from mlflow_ckpt.snapshot import take_snapshot
from mlflow_ckpt.storage import LocalStore, TransferConfig, open_store
from tests import servers


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=512)
    parser.add_argument("--shard-mb", type=int, default=64)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args(argv)
    server = servers.start_s3()
    try:
        run(args, server)
    finally:
        server.stop()


def run(args: argparse.Namespace, server: servers.Server) -> None:
    env = dict(servers.AWS_ENV, MLFLOW_S3_ENDPOINT_URL=server.url, AWS_ENDPOINT_URL_S3=server.url)
    os.environ.update(env)
    boto3.client("s3", endpoint_url=server.url).create_bucket(Bucket="bench")
    work = Path(tempfile.mkdtemp(prefix="mlflow-ckpt-transfer-"))
    shard = args.shard_mb * 1024 * 1024
    n = max(1, args.mb * 1024 * 1024 // shard)
    state = {f"t{i}": torch.randn(shard // 4) for i in range(n)}
    local = work / "ckpt"
    write_folder(
        LocalStore(str(local), local),
        take_snapshot(state, {"step": 0}, include_rng=False, copy=False),
        FolderSpec(max_shard_bytes=shard),
        model_id="bench",
        run_id="bench",
        step=0,
    )
    size = sum(p.stat().st_size for p in local.iterdir())
    print(
        f"checkpoint: {size / 1e6:.0f} MB in {len(list(local.iterdir()))} files; "
        f"{os.cpu_count()} CPUs; S3 server: moto on 127.0.0.1"
    )
    config = TransferConfig(max_workers=args.workers, progress=False)

    def ours_upload(dest: str) -> None:
        with open_store(dest, config) as store:
            for path in sorted(local.iterdir()):
                with store.open_writer(path.name) as f, open(path, "rb") as src:
                    shutil.copyfileobj(src, f, 16 * 1024 * 1024)

    def mlflow_upload(dest: str) -> None:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        get_artifact_repository(dest).log_artifacts(str(local))

    def ours_download(src: str) -> None:
        scratch = Path(tempfile.mkdtemp(dir=work))
        store = open_store(src, config)
        verify_files(store, read_manifest(store, scratch, src), scratch, src)
        shutil.rmtree(scratch)

    def mlflow_download(src: str) -> None:
        scratch = Path(tempfile.mkdtemp(dir=work))
        mlflow.artifacts.download_artifacts(artifact_uri=src, dst_path=str(scratch))
        shutil.rmtree(scratch)

    results = {}
    for name, fn, uri in (
        ("mlflow_ckpt upload", ours_upload, "s3://bench/ours"),
        ("mlflow log_artifacts", mlflow_upload, "s3://bench/mlflow"),
        ("mlflow_ckpt download+verify", ours_download, "s3://bench/ours"),
        ("mlflow download_artifacts", mlflow_download, "s3://bench/mlflow"),
    ):
        times = []
        for _ in range(2):
            start = time.perf_counter()
            fn(uri)
            times.append(time.perf_counter() - start)
        results[name] = min(times)
    print(f"\n{'variant':<30} {'seconds':>8} {'MB/s':>8}")
    for name, seconds in results.items():
        print(f"{name:<30} {seconds:>8.2f} {size / 1e6 / seconds:>8.0f}")
    up = results["mlflow log_artifacts"] / results["mlflow_ckpt upload"]
    down = results["mlflow download_artifacts"] / results["mlflow_ckpt download+verify"]
    verdict = "meets" if up >= 1.5 else "MISSES"
    print(f"\nupload speed-up vs mlflow.log_artifacts: {up:.2f}x ({verdict} the >= 1.5x target)")
    print(f"download speed-up vs mlflow download_artifacts (ours also verifies): {down:.2f}x")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])

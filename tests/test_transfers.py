"""Retries, permanent failures, bounded local spool, progress and secrets, against real S3."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import mlflow
import pytest
import torch
from mlflow import MlflowClient

import mlflow_ckpt
from mlflow_ckpt.storage import RetryPolicy, StoreError, TransferConfig, is_transient, open_store
from tests import servers
from tests.conftest import BUCKET, ROOT, _aws_kwargs, make_store, s3_env
from tests.faultproxy import FaultProxy, fault_proxy

FAST_RETRY = RetryPolicy(attempts=6, base=0.05, cap=0.2)


def save_once(transfer: TransferConfig, *, size: int = 1000) -> mlflow_ckpt.Checkpoint | None:
    with mlflow.start_run(run_name="faults") as run:
        with mlflow_ckpt.CheckpointManager(
            {"w": torch.arange(size, dtype=torch.float32)}, async_save=False, transfer=transfer
        ) as mgr:
            mgr.save(0)
    return mlflow_ckpt.latest_checkpoint(run.info.run_id)


@pytest.mark.parametrize("mode", ["drop", "503"])
def test_transient_failures_are_retried(s3_via_proxy, mode: str) -> None:
    s3_via_proxy.set(mode, 3)
    ckpt = save_once(TransferConfig(retry=FAST_RETRY))
    assert s3_via_proxy.faulted == 3
    restored = {"w": torch.zeros(1000)}
    mlflow_ckpt.load(ckpt, restored)
    assert torch.equal(restored["w"], torch.arange(1000, dtype=torch.float32))


@pytest.mark.parametrize("mode", ["drop", "503"])
def test_multipart_uploads_survive_transient_failures(s3_via_proxy, mode: str) -> None:
    """A 21 MiB shard in 5 MiB parts, 3 at a time, while the first connections fail: each
    failed request (start, part or commit) is retried on its own and the checkpoint loads."""
    big = torch.randn(21 * 1024 * 1024 // 4)
    s3_via_proxy.set(mode, 4)
    transfer = TransferConfig(
        retry=FAST_RETRY,
        max_workers=3,
        part_bytes=5 * 1024 * 1024,
        single_put_bytes=5 * 1024 * 1024,
    )
    with mlflow.start_run(run_name="parts-faults") as run:
        with mlflow_ckpt.CheckpointManager(
            {"big": big}, async_save=False, transfer=transfer
        ) as mgr:
            mgr.save(0)
    assert s3_via_proxy.faulted == 4
    restored = {"big": torch.zeros_like(big)}
    mlflow_ckpt.load(mlflow_ckpt.latest_checkpoint(run.info.run_id), restored)
    assert torch.equal(restored["big"], big)


def test_stalled_connection_times_out_and_is_retried(s3_via_proxy, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_S3_UPLOAD_EXTRA_ARGS", "{}")
    monkeypatch.setenv("AWS_METADATA_SERVICE_TIMEOUT", "1")
    import botocore.config  # the S3 client's read timeout bounds a stalled request

    s3_via_proxy.set("stall", 1)
    original = botocore.config.Config.__init__

    def short_timeouts(self, *args, **kwargs):  # real client, shorter socket timeouts
        kwargs.setdefault("read_timeout", 2)
        kwargs.setdefault("connect_timeout", 2)
        original(self, *args, **kwargs)

    monkeypatch.setattr(botocore.config.Config, "__init__", short_timeouts)
    ckpt = save_once(TransferConfig(retry=FAST_RETRY))
    assert ckpt is not None and s3_via_proxy.faulted == 1


def test_retries_exhausted_fail_clearly_and_nothing_is_listed(s3_via_proxy) -> None:
    s3_via_proxy.set("503", 1000)
    policy = RetryPolicy(attempts=3, base=0.01, cap=0.02)
    with mlflow.start_run(run_name="exhausted") as run:
        mgr = mlflow_ckpt.CheckpointManager(
            {"w": torch.ones(10)}, async_save=False, transfer=TransferConfig(retry=policy)
        )
        with pytest.raises(mlflow_ckpt.CheckpointWriteError) as info:
            mgr.save(0)
        message = str(info.value)
        assert "s3://ckpt/faults-" in message and "retries exhausted" in message
        assert "step 0" in message and run.info.run_id in message
        s3_via_proxy.set("pass", 0)  # the network is back: the next save works
        mgr.save(1)
        mgr.close()
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run.info.run_id)] == [1]


def test_permanent_failure_is_not_retried(s3_via_proxy) -> None:
    s3_via_proxy.set("403", 1000)
    started = time.monotonic()
    with pytest.raises(mlflow_ckpt.CheckpointWriteError) as info:
        save_once(TransferConfig(retry=RetryPolicy(attempts=6, base=1.0, cap=5.0)))
    assert time.monotonic() - started < 5  # no backoff happened
    message = str(info.value)
    assert "permanent" in message and "access denied" in message
    assert "s3://ckpt/faults-" in message


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_remote_save_writes_nothing_to_local_disk(
    tracking: str,
    s3_server: servers.Server,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    async_save: bool,
) -> None:
    """96 MiB in 12 shards go from memory to S3 (multipart parts of 5 MiB, single PUTs for
    the small files): not one byte appears under the temp dir while the save runs."""
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setenv("TMPDIR", str(spool))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    for key, value in s3_env(s3_server.url).items():
        monkeypatch.setenv(key, value)
    exp = mlflow.create_experiment("spool", artifact_location=f"s3://{BUCKET}/spool")
    mlflow.set_experiment(experiment_id=exp)
    shard = 8 * 1024 * 1024
    state = {f"t{i}": torch.randn(shard // 4) for i in range(12)}
    seen: set[str] = set()
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            used = 0
            with contextlib.suppress(FileNotFoundError):
                for p in spool.rglob("*"):
                    seen.add(p.name)
                    used += p.stat().st_size if p.is_file() else 0
            peak = max(peak, used)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    transfer = TransferConfig(
        max_workers=2, part_bytes=5 * 1024 * 1024, single_put_bytes=5 * 1024 * 1024
    )
    try:
        with mlflow.start_run(run_name="spool") as run:
            with mlflow_ckpt.CheckpointManager(
                state,
                async_save=async_save,
                max_shard_bytes=shard,
                transfer=transfer,
                timeline=False,
            ) as mgr:
                mgr.save(0)
    finally:
        done.set()
        sampler.join()
    assert (peak, seen) == (0, set())
    ckpt = mlflow_ckpt.latest_checkpoint(run.info.run_id)
    prefix = ckpt.artifact_location.removeprefix(f"s3://{BUCKET}/")
    client = boto3.client("s3", endpoint_url=s3_server.url, **_aws_kwargs())
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]
    sizes = {o["Key"].rsplit("/", 1)[1]: o["Size"] for o in listed}
    shards = [size for name, size in sizes.items() if name.startswith("tensors-")]
    assert len(shards) >= 12 and sum(shards) > 12 * shard  # multipart: 8 MiB > 5 MiB parts
    restored = {k: torch.empty_like(v) for k, v in state.items()}
    mlflow_ckpt.load(ckpt, restored)
    assert all(torch.equal(restored[k], state[k]) for k in state)


def test_progress_bar_on_large_uploads(s3_via_proxy, capsys) -> None:
    save_once(TransferConfig(progress=True, progress_min_bytes=1000), size=100_000)
    assert "upload" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["s3", "azure"])
def test_credentials_never_recorded(
    kind: str,
    tracking: str,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = make_store(kind, request, monkeypatch, tmp_path)
    secret = servers.AWS_ENV["AWS_SECRET_ACCESS_KEY"] if kind == "s3" else servers.AZURITE_KEY
    assert (
        secret in "".join(store.env.values()) or os.environ.get("AWS_SECRET_ACCESS_KEY") == secret
    )
    caplog.set_level(logging.DEBUG, logger="mlflow_ckpt")
    with mlflow.start_run(run_name="secrets") as run:
        with mlflow_ckpt.CheckpointManager({"w": torch.ones(3)}, monitor="loss") as mgr:
            mgr.step(0, {"loss": 1.0})
    client = MlflowClient()
    recorded = [str(client.get_run(run.info.run_id).data)]
    for ckpt in mlflow_ckpt.list_checkpoints(run.info.run_id):
        model = client.get_logged_model(ckpt.model_id)
        recorded += [str(model.tags), str(model.params), str(model)]
        recorded.append(str(mlflow_ckpt.load_training_state(ckpt)["_progress"]))
        with open_store(ckpt.artifact_location) as files:
            for name in ("manifest.json", "MLmodel", "state.json"):
                recorded.append(files.read_bytes(name, tmp_path).decode())
    # a failing store must not leak them either
    if kind == "s3":
        monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://127.0.0.1:9")
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    else:  # a rejected key: permanent, so the SDK's own minute-long backoff never starts
        wrong = servers.azurite_connection_string(request.getfixturevalue("azurite_server").port)
        monkeypatch.setenv(
            "AZURE_STORAGE_CONNECTION_STRING", wrong.replace(servers.AZURITE_KEY, "d3Jvbmc=")
        )
    with mlflow.start_run(run_name="fails"):
        with pytest.raises(mlflow_ckpt.CheckpointWriteError) as info:
            with mlflow_ckpt.CheckpointManager(
                {"w": torch.ones(3)},
                async_save=False,
                transfer=TransferConfig(retry=RetryPolicy(attempts=2, base=0.01, cap=0.01)),
            ) as mgr:
                mgr.save(0)
    recorded += [str(info.value), repr(info.value), caplog.text]
    assert "failed" in str(info.value)
    for text in recorded:
        assert secret not in text


@pytest.mark.slow
def test_azure_upload_of_more_than_ten_blocks(
    tracking: str, azurite_server: servers.Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 72 MiB shard goes up from memory as 15 staged blocks of 5 MiB, committed at once
    (MLflow's own multipart upload breaks at 10 blocks)."""
    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING", servers.azurite_connection_string(azurite_server.port)
    )
    exp = mlflow.create_experiment(
        "azure-blocks",
        artifact_location=f"wasbs://{BUCKET}@devstoreaccount1.blob.core.windows.net/blocks",
    )
    mlflow.set_experiment(experiment_id=exp)
    big = torch.randn(18 * 1024 * 1024)  # 72 MiB: above the SDK's 64 MiB single-put limit
    with mlflow.start_run(run_name="blocks") as run:
        with mlflow_ckpt.CheckpointManager(
            {"big": big},
            async_save=False,
            transfer=TransferConfig(part_bytes=5 * 1024 * 1024, single_put_bytes=5 * 1024 * 1024),
        ) as mgr:
            mgr.save(0)
    restored = {"big": torch.empty_like(big)}
    mlflow_ckpt.load(mlflow_ckpt.latest_checkpoint(run.info.run_id), restored)
    assert torch.equal(restored["big"], big)


def test_progress_bar_on_large_downloads(s3_via_proxy, capsys) -> None:
    ckpt = save_once(TransferConfig(progress=False), size=100_000)
    capsys.readouterr()
    from mlflow_ckpt.catalog import resolve
    from mlflow_ckpt.catalog.reader import read_checkpoint
    from mlflow_ckpt.folder import read_folder
    from mlflow_ckpt.storage import open_store

    model = resolve(ckpt, MlflowClient())
    config = TransferConfig(progress=True, progress_min_bytes=1000)
    with open_store(model.artifact_location, config) as store:
        import tempfile

        with tempfile.TemporaryDirectory() as scratch:
            loaded = read_folder(store, Path(scratch), "test")
    assert "download" in capsys.readouterr().err
    assert loaded.manifest.step == 0
    assert read_checkpoint(model).manifest.step == 0


# ------------------------------------------------ one retry layer, on every remote store

RETRY_KINDS = ["s3", "azure", "gcs", "proxy"]


@pytest.fixture(params=RETRY_KINDS)
def faulty(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[FaultProxy, str]]:
    """A fault proxy in front of one store's real server, and a fresh folder URI behind it.

    The environment asks the SDKs for retries of their own (``AWS_MAX_ATTEMPTS=10``...):
    the stores must try each call once whatever it says, so every attempt is one
    connection at the proxy."""
    folder = f"retry-{uuid.uuid4().hex[:10]}"
    server = request.getfixturevalue(
        {"s3": "s3_server", "azure": "azurite_server", "gcs": "gcs_server"}.get(
            request.param, "proxy_server"
        )
    )
    with fault_proxy(server.port) as proxy:
        if request.param == "s3":
            env = dict(s3_env(proxy.url), AWS_MAX_ATTEMPTS="10", AWS_RETRY_MODE="legacy")
            uri = f"s3://{BUCKET}/{folder}"
        elif request.param == "azure":
            env = {"AZURE_STORAGE_CONNECTION_STRING": servers.azurite_connection_string(proxy.port)}
            uri = f"wasbs://{BUCKET}@devstoreaccount1.blob.core.windows.net/{folder}"
        elif request.param == "gcs":
            # The SDK fetches each bucket's metadata once per client in the background (for
            # tracing attributes, even with tracing off): one more request, not a retry.
            env = {
                "STORAGE_EMULATOR_HOST": proxy.url,
                "GOOGLE_CLOUD_PROJECT": "test",
                "DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA": "true",
            }
            uri = f"gs://{BUCKET}/{folder}"
        else:  # an mlflow server proxying artifacts, addressed by its HTTP URI
            env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5"}
            uri = f"{proxy.url}/api/2.0/mlflow-artifacts/artifacts/{folder}"
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        yield proxy, uri


@pytest.mark.parametrize("mode", ["503", "drop"])
def test_a_transient_failure_is_retried_by_our_layer_alone(
    faulty: tuple[FaultProxy, str], mode: str
) -> None:
    """A 503 or a reset connection, on a write and on a read: exactly ``attempts`` requests
    reach the server (no SDK retries nested inside ours), then a clear error."""
    proxy, uri = faulty
    proxy.set(mode, 1000)
    policy = RetryPolicy(attempts=3, base=0.01, cap=0.02)
    with open_store(uri, TransferConfig(retry=policy)) as store:
        before = proxy.connections
        with pytest.raises(StoreError, match="transient \\(retries exhausted\\)"):
            store.write_bytes("f.bin", b"abc")
            store.flush()
        assert proxy.connections - before == 3
        before = proxy.connections
        with pytest.raises(StoreError, match="retries exhausted"):
            store.exists("f.bin")
        assert proxy.connections - before == 3


@pytest.mark.parametrize("mode", ["403", "404"])
def test_a_permanent_failure_is_sent_once(faulty: tuple[FaultProxy, str], mode: str) -> None:
    proxy, uri = faulty
    proxy.set(mode, 1000)
    policy = RetryPolicy(attempts=6, base=1.0, cap=5.0)
    with open_store(uri, TransferConfig(retry=policy)) as store:
        before, started = proxy.connections, time.monotonic()
        with pytest.raises(StoreError, match="permanent") as info:
            store.write_bytes("f.bin", b"abc")
            store.flush()
        assert proxy.connections - before == 1
        assert time.monotonic() - started < 5  # no backoff either
        fix = "access denied" if mode == "403" else "does not exist"
        assert fix in str(info.value)


def test_dropped_connections_are_retried_and_the_file_arrives(
    faulty: tuple[FaultProxy, str], tmp_path: Path
) -> None:
    """The first two connections are reset: the upload is sent a third time and lands; the
    same store then lists, reads and deletes it."""
    proxy, uri = faulty
    with open_store(uri, TransferConfig(retry=FAST_RETRY)) as store:
        proxy.set("drop", 2)
        store.write_bytes("f.bin", b"payload")
        store.flush()
        requests = 2 if uri.startswith("gs://") else 1  # GCS: open the session, send bytes
        assert (proxy.faulted, proxy.connections) == (2, 2 + requests)
        assert store.list_sizes("") == {"f.bin": 7}
        assert store.read_bytes("f.bin", tmp_path) == b"payload"
        store.delete_all()
        assert store.list_sizes("") == {}


def test_failures_are_classified_by_type_and_status_never_by_message() -> None:
    """Real SDK exception objects: what a reply's status or the exception's type says
    decides; the same words in a message of another type decide nothing."""
    from azure.core.exceptions import ServiceRequestError, ServiceResponseError
    from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError
    from google.api_core import exceptions as google
    from mlflow.exceptions import MlflowException

    def s3(status: int, code: str) -> ClientError:
        reply = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
        return ClientError(reply, "PutObject")  # type: ignore[arg-type]

    def wrapped(cause: BaseException) -> MlflowException:
        try:
            raise cause
        except BaseException:  # as MLflow's http_request wraps it: context, no cause
            try:
                raise MlflowException("API request failed")
            except MlflowException as outer:
                return outer

    transient = [
        s3(503, "ServiceUnavailable"),
        s3(500, "InternalError"),
        s3(400, "RequestTimeout"),  # S3's idle-socket timeout comes as a 400
        s3(429, "TooManyRequests"),
        EndpointConnectionError(endpoint_url="http://x"),
        ReadTimeoutError(endpoint_url="http://x"),
        ServiceRequestError("no connection"),
        ServiceResponseError("connection cut"),
        google.ServiceUnavailable("busy"),
        google.TooManyRequests("slow down"),
        ConnectionResetError(104, "reset"),
        TimeoutError("timed out"),
        wrapped(ConnectionRefusedError(111, "refused")),
    ]
    permanent = [
        s3(403, "AccessDenied"),
        s3(404, "NoSuchBucket"),
        google.Forbidden("no"),
        google.NotFound("no bucket"),
        RuntimeError("HTTP 503 Service Unavailable"),  # words, not a reply
        ValueError("ConnectionError: status code 500"),
        wrapped(RuntimeError("status 503")),
    ]
    assert [e for e in transient if not is_transient(e)] == []
    assert [e for e in permanent if is_transient(e)] == []


def test_classifying_needs_no_sdk_of_another_store() -> None:
    """An S3-only install has no Azure or Google Cloud packages (MLflow itself needs
    ``google.protobuf`` only): classification still works."""
    script = (
        "import sys\n"
        "for name in ('azure', 'google.cloud', 'google.api_core', 'google.auth',\n"
        "             'google.resumable_media'):\n"
        "    sys.modules[name] = None  # importing it raises ImportError\n"
        "from mlflow_ckpt.storage.retry import is_transient\n"
        "from botocore.exceptions import EndpointConnectionError\n"
        "assert is_transient(EndpointConnectionError(endpoint_url='http://x'))\n"
        "assert not is_transient(RuntimeError('HTTP 503'))\n"
        "assert 'azure.core' not in sys.modules\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.stdout.strip() == "ok", done.stderr

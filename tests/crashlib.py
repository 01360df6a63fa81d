"""The kill -9 harness, shared by ``tests/test_crash.py`` and ``benchmarks/faults.py``.

A chain of training processes (``tests.crash_child``) works on one run. Each is SIGKILLed at a
seeded random moment (during its resume, a snapshot, a file write, a commit or a retention
deletion, wherever the moment falls) and the next one resumes the run. A trial *survives*
when the restart succeeds and resumes from the newest committed checkpoint; a checkpoint is
*lost* when a step reported committed before the kill is older than where the next restart
resumed. At the end the run is cleaned with ``mlflow-ckpt gc`` and a last process runs to
completion; then every listed checkpoint must verify and load, no LoggedModel may be left
PENDING, and no temporary or orphaned file may remain: in the store, nor in the processes'
temp directory (``<workdir>/tmp``), where the last resume sweeps the scratch folders the
killed processes left.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parent.parent
_CLI_LOCK = threading.Lock()


@dataclass
class ChainResult:
    """What a chain of killed-and-restarted trainings saw."""

    trials: int = 0
    survived: int = 0
    lost: int = 0
    killed_during_resume: int = 0
    problems: list[str] = field(default_factory=list)
    final_checkpoints: int = 0


def prepare(workdir: Path, template_db: Path | None = None) -> str:
    """A tracking store in ``workdir`` with an experiment "crash" storing under it."""
    workdir.mkdir(parents=True, exist_ok=True)
    db = workdir / "mlflow.db"
    if template_db is not None:
        shutil.copy(template_db, db)
    uri = f"sqlite:///{db}"
    MlflowClient(uri).create_experiment("crash", artifact_location=str(workdir / "artifacts"))
    return uri


def _lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


class Zygote:
    """A warm ``tests.crash_child --zygote`` that forks one training process per trial."""

    def __init__(self, workdir: Path, uri: str, child_env: Mapping[str, str] | None = None) -> None:
        (workdir / "tmp").mkdir(exist_ok=True)
        env = dict(
            os.environ,
            **(child_env or {}),
            TMPDIR=str(workdir / "tmp"),  # theirs alone: what they leave there is checked
            MLFLOW_TRACKING_URI=uri,
            MLFLOW_EXPERIMENT_NAME="crash",
            PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        )
        self.workdir = workdir
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.crash_child", "--zygote"],
            cwd=workdir,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def spawn(self, log: Path, sync: bool, steps: int | None = None) -> int:
        """Fork a training process; return its PID."""
        args = ["--run-file", str(self.workdir / "run"), "--log", str(log)]
        args += (["--sync"] if sync else []) + ([] if steps is None else ["--steps", str(steps)])
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(" ".join([str(log.with_suffix(".err")), *args]) + "\n")
        self.proc.stdin.flush()
        kind, pid = self.proc.stdout.readline().split()
        assert kind == "pid", kind
        return int(pid)

    def wait(self, pid: int) -> int:
        """The exit code of process ``pid`` (negative: killed by that signal)."""
        assert self.proc.stdout is not None
        kind, got, code = self.proc.stdout.readline().split()
        assert kind == "exit" and int(got) == pid, (kind, got)
        return int(code)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def run_chain(
    workdir: Path,
    uri: str,
    *,
    trials: int,
    seed: int,
    sync: bool,
    max_delay_s: float = 1.5,
    child_env: Mapping[str, str] | None = None,
) -> ChainResult:
    """Kill and restart a training ``trials`` times, then finish it and check the run.

    ``child_env``: extra environment of the training processes (see tests/crash_child.py).
    """
    zygote = Zygote(workdir, uri, child_env)
    try:
        return _chain(zygote, workdir, uri, trials, seed, sync, max_delay_s)
    finally:
        zygote.close()


def _chain(
    zygote: Zygote,
    workdir: Path,
    uri: str,
    trials: int,
    seed: int,
    sync: bool,
    max_delay_s: float,
) -> ChainResult:
    rng = random.Random(seed)
    result = ChainResult()
    committed = -1  # newest step any killed process reported as committed
    for trial in range(trials):
        log = workdir / f"trial-{trial}.log"
        pid = zygote.spawn(log, sync)
        deadline = time.monotonic() + 120
        while "started" not in _lines(log) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, max_delay_s))
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        code = zygote.wait(pid)
        result.trials += 1
        lines = _lines(log)
        resumed = [line for line in lines if line.startswith(("resumed", "resume-mismatch"))]
        if code != -signal.SIGKILL:
            err = log.with_suffix(".err").read_text()[-2000:]
            result.problems.append(f"trial {trial}: exited {code} before the kill\n{err}")
            continue
        ok = True
        if any(line.startswith("resume-mismatch") for line in resumed):
            result.problems.append(f"trial {trial}: {resumed[0]}")
            ok = False
        if resumed and resumed[0].startswith("resumed"):
            step = int(resumed[0].split()[1])
            if step < committed:
                result.lost += 1
                result.problems.append(
                    f"trial {trial}: resumed from {step}, but {committed} had been committed"
                )
                ok = False
        elif (workdir / "run").exists() and trial > 0:
            result.killed_during_resume += 1
        result.survived += ok
        for line in lines:
            if line.startswith("committed"):
                committed = max(committed, int(line.split()[1]))
    _finish(zygote, workdir, uri, sync, committed, result)
    return result


def _finish(
    zygote: Zygote, workdir: Path, uri: str, sync: bool, committed: int, result: ChainResult
) -> None:
    from click.testing import CliRunner

    from mlflow_ckpt.catalog import load_training_state, resolve, tags
    from mlflow_ckpt.catalog.queries import list_checkpoints
    from mlflow_ckpt.catalog.reader import verify_checkpoint
    from mlflow_ckpt.cli import main as cli
    from mlflow_ckpt.storage.local import TEMP_MARKER

    client = MlflowClient(uri)
    run_id = (workdir / "run").read_text().strip()
    # 1. `mlflow-ckpt gc` cleans up after the last kill without resuming anything.
    with _CLI_LOCK:  # --tracking-uri sets MLflow's process-wide URI; chains run in threads
        gc = CliRunner().invoke(cli, ["--tracking-uri", uri, "gc", run_id])
        mlflow.set_tracking_uri(None)
    if gc.exit_code != 0:
        result.problems.append(f"gc exited {gc.exit_code}: {gc.output} {gc.exception!r}")
    experiment = client.get_run(run_id).info.experiment_id
    statuses = [m.tags.get(tags.STATUS) for m in client.search_logged_models([experiment])]
    if tags.PENDING in statuses:
        result.problems.append(f"gc left PENDING checkpoints: {statuses}")
    # 2. A last restart runs to completion.
    log = workdir / "final.log"
    pid = zygote.spawn(log, sync, steps=committed + 4)
    if zygote.wait(pid) != 0 or "done" not in _lines(log):
        result.problems.append(f"the final run failed: {log.with_suffix('.err').read_text()}")
        return
    resumed = [line for line in _lines(log) if line.startswith("resume")]
    if not resumed or resumed[0].startswith("resume-") or int(resumed[0].split()[1]) < committed:
        result.problems.append(f"final resume: {resumed} (committed {committed})")
    # 3. Every listed checkpoint verifies and loads; nothing is left behind.
    checkpoints = list_checkpoints(run_id, client=client)
    result.final_checkpoints = len(checkpoints)
    for ckpt in checkpoints:
        model = resolve(ckpt, client)
        problems = verify_checkpoint(model)
        if problems:
            result.problems.append(f"{ckpt.uri} does not verify: {problems}")
            continue
        if load_training_state(ckpt, client=client)["_progress"]["step"] != ckpt.step:
            result.problems.append(f"{ckpt.uri} holds the wrong step")
    leftovers = [p for p in (workdir / "artifacts").rglob(f"*{TEMP_MARKER}*")]
    if leftovers:
        result.problems.append(f"temporary files left: {leftovers[:5]}")
    scratch = _scratch_left(workdir / "tmp")
    if scratch:
        result.problems.append(f"scratch folders of killed processes left: {scratch[:5]}")
    _check_shared_area(client, run_id, result)
    live = {c.model_id for c in checkpoints}
    for folder in (workdir / "artifacts" / "models").iterdir():
        if folder.name not in live and any(p.is_file() for p in folder.rglob("*")):
            status = client.get_logged_model(folder.name).tags.get(tags.STATUS)
            result.problems.append(f"files of {status} checkpoint {folder.name} remain")


def _scratch_left(tmp: Path) -> list[str]:
    """Scratch and upload folders left in ``tmp``: once every process is gone, the last
    resume's sweep should have taken them all (a hidden one, killed before it was locked,
    is the sweep's to judge later)."""
    from mlflow_ckpt.storage.staging import PREFIXES

    return [p.name for p in tmp.iterdir() if p.name.startswith(PREFIXES)]


def _check_shared_area(client: MlflowClient, run_id: str, result: ChainResult) -> None:
    """Incremental saves: the run's shared area holds exactly the groups that the run's
    checkpoints reference: none lost (they verified above), none left unreferenced."""
    from mlflow_ckpt.catalog import tags
    from mlflow_ckpt.catalog.queries import search_models
    from mlflow_ckpt.catalog.shared import references, shared_area_uri
    from mlflow_ckpt.storage import local_path_of

    run = client.get_run(run_id)
    area = local_path_of(shared_area_uri(run.info.artifact_uri))
    on_disk = {p.name for p in area.iterdir() if p.is_dir()} if area and area.is_dir() else set()
    models = search_models(client, [run.info.experiment_id], f"source_run_id = '{run_id}'")
    wanted: set[str] = set()
    for model in models:
        if model.tags.get(tags.STATUS) == tags.COMMITTED:
            wanted |= references(model)
    if on_disk != wanted:
        result.problems.append(
            f"shared area holds {sorted(on_disk)}, checkpoints reference {sorted(wanted)}"
        )

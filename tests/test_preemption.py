"""Preemptible jobs, with real processes and real signals: the same command line restarted
after kill -9 or SIGTERM continues the same run bit for bit; racing first starts end with
one run; a dead writer on another host (its own UTS namespace) is waited for, a live one
refused.

Every child runs ``python -m tests.train_script auto`` with the job key in
``MLFLOW_CKPT_RUN_KEY``: the identical command each time, as a scheduler would restart it.
Nothing here is timed; a child is signalled once it has printed the step a test waits for.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import ViewType

import mlflow_ckpt
from mlflow_ckpt.catalog import tags
from tests.conftest import RESUME_STEPS, ROOT

pytestmark = pytest.mark.slow


def _command(out: Path, *extra: str) -> list[str]:
    steps = ["--steps", str(RESUME_STEPS), "--out", str(out), "--every", "5"]
    return [sys.executable, "-m", "tests.train_script", "auto", *steps, *extra]


def _env(key: str) -> dict[str, str]:
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow.get_tracking_uri())
    env.update(MLFLOW_EXPERIMENT_NAME="tests", MLFLOW_CKPT_RUN_KEY=key)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    for name in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "MLFLOW_EXPERIMENT_ID"):
        env.pop(name, None)
    return env


class Child:
    """A training process whose stdout lines are read as they come."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, bufsize=1
        )
        self.lines: list[str] = []

    def wait_for(self, prefix: str, timeout: float = 180) -> str:
        """Read stdout until a line starts with ``prefix``; return it."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line.strip())
            if line.startswith(prefix):
                return line.strip()
        raise AssertionError(f"never printed {prefix!r}: {self.lines[-5:]}\n{self.stderr()}")

    def finish(self, timeout: float = 180) -> int:
        out, _ = self.proc.communicate(timeout=timeout)
        self.lines += out.splitlines()
        return self.proc.returncode

    def stderr(self) -> str:
        return self.log.read_text()[-4000:] if self.log.exists() else ""

    def steps(self) -> list[int]:
        return [int(line.split()[1]) for line in self.lines if line.startswith("step ")]


def _run_once(out: Path, env: dict[str, str], log: Path, *extra: str) -> Child:
    child = Child(_command(out, *extra), env, log)
    code = child.finish()
    assert code == 0, child.stderr()
    return child


def _assert_same_as_straight(out: Path, straight: Path) -> None:
    got, want = torch.load(out, weights_only=False), torch.load(straight, weights_only=False)
    for key in ("model", "optimizer"):
        assert str(got[key]) == str(want[key]), key
    assert got["lr"] == want["lr"]
    assert (got["python"], got["numpy"]) == (want["python"], want["numpy"])
    assert torch.equal(got["torch"], want["torch"])
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), name


def _job_runs(key: str, view: int = ViewType.ACTIVE_ONLY) -> list[mlflow.entities.Run]:
    experiment = mlflow.get_experiment_by_name("tests").experiment_id
    return MlflowClient().search_runs(
        [experiment], f"tags.`{tags.RUN_KEY}` = '{key}'", run_view_type=view
    )


def _history_steps(run_id: str, metric: str) -> list[int]:
    return sorted(m.step for m in MlflowClient().get_metric_history(run_id, metric))


def test_same_command_after_kill9_continues_the_run_bit_for_bit(
    tracking: str, straight_state: Path, tmp_path: Path
) -> None:
    env, out = _env("kill9-job"), tmp_path / "final.pt"
    first = Child(_command(out, "--sleep", "0.05"), env, tmp_path / "first.log")
    first.wait_for("step 17")  # checkpoints of steps 4, 9 and 14 committed (or in flight)
    first.proc.kill()
    assert first.finish() == -signal.SIGKILL
    (run,) = _job_runs("kill9-job")
    newest = mlflow_ckpt.latest_checkpoint(run.info.run_id).step

    second = _run_once(out, env, tmp_path / "second.log")  # the identical command
    assert f"run {run.info.run_id}" in second.lines
    assert f"resumed at {newest + 1}" in second.lines
    _assert_same_as_straight(out, straight_state)
    assert [r.info.run_id for r in _job_runs("kill9-job")] == [run.info.run_id]
    for metric in ("train_loss", "val_loss"):  # every step logged exactly once
        assert _history_steps(run.info.run_id, metric) == list(range(RESUME_STEPS)), metric
    assert MlflowClient().get_run(run.info.run_id).info.status == "FINISHED"


def test_sigterm_at_a_random_step_saves_it_and_the_restart_continues_from_it(
    tracking: str, straight_state: Path, tmp_path: Path
) -> None:
    env, out = _env("sigterm-job"), tmp_path / "final.pt"
    step = random.Random(30).randrange(6, 30)
    first = Child(_command(out, "--sleep", "0.05"), env, tmp_path / "first.log")
    first.wait_for(f"step {step}")
    first.proc.send_signal(signal.SIGTERM)
    assert first.finish() == -signal.SIGTERM, first.stderr()  # ended as SIGTERM would have
    last_done = first.steps()[-1]
    (run,) = _job_runs("sigterm-job")
    saved = mlflow_ckpt.latest_checkpoint(run.info.run_id)
    assert tags.PREEMPTED in saved.triggers
    assert saved.step in (last_done, last_done + 1)  # the step it was in, or just finished
    finished = MlflowClient().get_run(run.info.run_id)
    assert finished.info.status == "KILLED"
    assert tags.RUN_WRITER not in finished.data.tags  # the lease was released

    second = _run_once(out, env, tmp_path / "second.log")
    assert f"resumed at {saved.step + 1}" in second.lines  # zero steps lost
    _assert_same_as_straight(out, straight_state)
    for metric in ("train_loss", "val_loss"):
        assert _history_steps(run.info.run_id, metric) == list(range(RESUME_STEPS)), metric


def test_a_signal_during_a_save_in_flight_commits_both_in_order(
    tracking: str, tmp_path: Path
) -> None:
    env = _env("in-flight")
    extra = ("--signal-self-at", "9", "--ballast-mb", "96")  # step 9's save: 96 MB in flight
    child = Child(_command(tmp_path / "x.pt", *extra), env, tmp_path / "child.log")
    assert child.finish() == -signal.SIGTERM, child.stderr()
    (run,) = _job_runs("in-flight")
    newest, previous, *_ = mlflow_ckpt.list_checkpoints(run.info.run_id)
    assert (previous.step, previous.triggers) == (9, ("periodic",))
    assert (newest.step, newest.triggers) == (10, (tags.PREEMPTED,))
    assert previous.created_at <= newest.created_at


def test_no_step_within_the_grace_period_ends_the_process(tracking: str, tmp_path: Path) -> None:
    env = _env("stalled")
    extra = ("--sleep", "0.02", "--stall-after", "6", "--grace", "2")
    child = Child(_command(tmp_path / "x.pt", *extra), env, tmp_path / "child.log")
    child.wait_for("step 6")
    child.proc.send_signal(signal.SIGTERM)
    assert child.finish(timeout=60) == 128 + signal.SIGTERM  # the watchdog, not the sleep
    assert "no step() saved within preempt_grace_s=2s of SIGTERM" in child.stderr()
    (run,) = _job_runs("stalled")
    assert mlflow_ckpt.latest_checkpoint(run.info.run_id).step == 4  # nothing half-saved


def test_a_second_signal_ends_the_process_at_once(tracking: str, tmp_path: Path) -> None:
    env = _env("twice")
    extra = ("--sleep", "0.02", "--stall-after", "6")
    child = Child(_command(tmp_path / "x.pt", *extra), env, tmp_path / "child.log")
    child.wait_for("step 6")
    child.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert child.proc.poll() is None  # the first only asked for a save at the next step
    child.proc.send_signal(signal.SIGTERM)
    assert child.finish(timeout=30) == -signal.SIGTERM
    assert "a second SIGTERM arrived" in child.stderr()


def test_two_simultaneous_first_starts_end_with_one_run(tracking: str, tmp_path: Path) -> None:
    """Two starts of one job released in the same millisecond (a retried submission): one
    run trains, the other process adopts it. Tried with up to three keys, until the two
    have really both created a run (the race), each time ending with one run."""
    raced = 0
    for attempt in range(3):
        key = f"twins-{attempt}"
        env, go = _env(key), tmp_path / f"go-{attempt}"
        children = [
            Child(_command(tmp_path / f"{n}.pt", "--go-file", str(go)), env, tmp_path / f"{n}.log")
            for n in (f"a{attempt}", f"b{attempt}")
        ]
        for child in children:
            child.wait_for("waiting")  # imported, tracking store open
        go.touch()
        codes = [child.finish() for child in children]
        errors = [child.stderr() for child in children]
        assert sorted(codes) in ([0, 0], [0, 1]), errors
        for code, err in zip(codes, errors, strict=True):
            assert code == 0 or "WriterConflictError" in err, err
        (run,) = _job_runs(key)
        assert mlflow_ckpt.latest_checkpoint(run.info.run_id).step == RESUME_STEPS - 1
        deleted = _job_runs(key, ViewType.DELETED_ONLY)
        assert len(deleted) <= 1 and all(r.info.run_id != run.info.run_id for r in deleted)
        if deleted:  # both created a run: the loser deleted its own and adopted the winner's
            assert any(f"Another first start of job '{key}'" in err for err in errors)
            raced += 1
            break
    assert raced, "the two starts never both created a run in three attempts"


def _other_host(argv: list[str]) -> list[str]:
    """``argv`` run in a UTS namespace of its own, whose host name is ``other-node``."""
    script = 'hostname other-node && exec "$@"'
    return ["unshare", "--uts", "sh", "-c", script, "sh", *argv]


@pytest.fixture
def can_unshare() -> None:
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run(_other_host(["true"]), capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a UTS namespace here (needs root): {probe.stderr.strip()}")


def test_a_dead_writer_on_another_host_is_waited_for_and_a_live_one_refused(
    tracking: str, tmp_path: Path, can_unshare: None
) -> None:
    env = _env("hosts")
    ttl = ("--lease-ttl", "12")  # longer than a restart takes to import torch and MLflow
    # The writer stops calling step() after step 6 and only heartbeats: alive however long
    # the second start takes to import (on a loaded machine it once outlasted the training).
    stalled = ("--sleep", "0.3", "--stall-after", "6")
    writer = Child(
        _other_host(_command(tmp_path / "w.pt", *stalled, *ttl)), env, tmp_path / "w.log"
    )
    writer.wait_for("step 6")
    # A second start while the writer on "other-node" heartbeats: refused within the TTL.
    live = Child(_command(tmp_path / "l.pt", *ttl), env, tmp_path / "live.log")
    assert live.finish(timeout=60) == 1
    assert "WriterConflictError" in live.stderr() and "heartbeat advanced" in live.stderr()
    assert "on other-node" in live.stderr()
    # The node dies: its lease can only expire. The restart waits for that, then continues.
    writer.proc.kill()
    assert writer.finish() == -signal.SIGKILL
    (run,) = _job_runs("hosts")
    newest = mlflow_ckpt.latest_checkpoint(run.info.run_id).step
    restart = _run_once(tmp_path / "r.pt", env, tmp_path / "restart.log", *ttl)
    assert "cannot be checked from this host; waiting up to" in restart.stderr()
    assert f"resumed at {newest + 1}" in restart.lines
    assert mlflow_ckpt.latest_checkpoint(run.info.run_id).step == RESUME_STEPS - 1

"""``torchrun --max-restarts``: after a rank dies (SIGKILL) or is preempted (SIGTERM), torchrun
restarts every worker and, with ``resume="auto"``, they continue the same MLflow run from
the newest commit, bit for bit against an uninterrupted job (DDP and FSDP2, gloo, 2 ranks).

No run name is given: the job's key is ``TORCHELASTIC_RUN_ID``, the same for every restart
of one ``torchrun``. The job initializes its group on a store prefixed by the restart
attempt (``tests/dist_job.py::init_process_group``), without which torch 2.13's restarted
attempts fail to connect in about half the runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import pytest
from safetensors.torch import load_file

import mlflow_ckpt
from mlflow_ckpt.catalog import tags
from tests.conftest import ROOT
from tests.distlib import JOB, reports, torchrun
from tests.test_distributed import assert_same

if TYPE_CHECKING:
    from conftest import SharedStore  # the root conftest's (module_store)

pytestmark = pytest.mark.slow
RESTARTS = ("--max-restarts=2",)


@pytest.fixture(scope="module")
def straight(module_store: SharedStore) -> Callable[[str], Path]:
    """The uninterrupted job of a strategy, run once per module (on the module's store):
    every restarted job of that strategy is compared with its files, and only with them."""
    done: dict[str, Path] = {}

    def get(strategy: str) -> Path:
        if strategy not in done:
            out = module_store.folder / f"straight-{strategy}"
            args = ("--strategy", strategy, "--steps", "8", "--save-every", "3", "--auto")
            torchrun(2, out, *args, env=module_store.env)
            done[strategy] = out
        return done[strategy]

    return get


def _assert_bit_for_bit(straight: Path, resumed: Path) -> None:
    for name in ("final.safetensors", "local-0.safetensors", "local-1.safetensors"):
        assert_same(load_file(straight / name), load_file(resumed / name))
    assert [r["rng"] for r in reports(straight)] == [r["rng"] for r in reports(resumed)]


def _job_runs(run_id: str) -> list[mlflow.entities.Run]:
    key = mlflow.get_run(run_id).data.tags[tags.RUN_KEY]
    assert key.startswith("torchelastic-")
    return mlflow.search_runs(
        filter_string=f"tags.`{tags.RUN_KEY}` = '{key}'",
        output_format="list",
        search_all_experiments=True,
    )


# The ddp tests share one straight job: `make test` keeps the group on one xdist worker.
@pytest.mark.parametrize(
    "strategy", [pytest.param("ddp", marks=pytest.mark.xdist_group("elastic-ddp")), "fsdp2"]
)
def test_a_rank_killed_mid_run_is_restarted_and_the_job_ends_bit_for_bit(
    tracking: str, tmp_path: Path, strategy: str, straight: Callable[[str], Path]
) -> None:
    common = ["--strategy", strategy, "--steps", "8", "--save-every", "3", "--auto"]
    job = torchrun(
        2, tmp_path / "job", *common, "--first-attempt-kill", "1:6", torchrun_args=RESTARTS
    )
    assert job.returncode == 0
    done = reports(tmp_path / "job")
    assert [r["attempt"] for r in done] == [1, 1]  # what finished is the restarted attempt
    assert [r["start_step"] for r in done] == [6, 6]  # from step 5's commit (every 3: 2, 5)
    _assert_bit_for_bit(straight(strategy), tmp_path / "job")
    run_id = done[0]["run_id"]
    assert len(_job_runs(run_id)) == 1  # one MLflow run for the whole job
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run_id)] == [7, 5, 2]


@pytest.mark.xdist_group("elastic-ddp")
def test_one_rank_preempted_makes_every_rank_save_that_step_then_the_restart_continues(
    tracking: str, tmp_path: Path, straight: Callable[[str], Path]
) -> None:
    common = ["--strategy", "ddp", "--steps", "8", "--save-every", "3", "--auto"]
    job = torchrun(
        2, tmp_path / "job", *common, "--first-attempt-sigterm", "1:3", torchrun_args=RESTARTS
    )
    assert job.returncode == 0
    done = reports(tmp_path / "job")
    assert [r["start_step"] for r in done] == [5, 5]  # rank 1 alone got SIGTERM after step 3
    run_id = done[0]["run_id"]
    ckpts = mlflow_ckpt.list_checkpoints(run_id)
    assert [(c.step, c.triggers) for c in ckpts] == [
        (7, ("last",)),
        (5, ("periodic",)),
        (4, (tags.PREEMPTED,)),  # both ranks' shards: one checkpoint, committed
        (2, ("periodic",)),
    ]
    _assert_bit_for_bit(straight("ddp"), tmp_path / "job")
    assert len(_job_runs(run_id)) == 1


def test_sigterm_to_torchrun_saves_on_every_rank_and_the_next_torchrun_continues(
    tracking: str, tmp_path: Path
) -> None:
    """A pod eviction: SIGTERM to torchrun, which forwards it to every worker and exits
    without restarting; the scheduler runs the command again. The key must outlive one
    torchrun (``--standalone`` draws a new ID each time): here ``MLFLOW_CKPT_RUN_KEY``."""
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow.get_tracking_uri(), OMP_NUM_THREADS="1")
    env.update(MLFLOW_CKPT_RUN_KEY="evicted-pod", MLFLOW_EXPERIMENT_NAME="tests")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    common = ["--strategy", "ddp", "--steps", "200", "--save-every", "50", "--auto"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    first = subprocess.Popen(
        [*cmd, str(JOB), "--out", str(tmp_path / "first"), *common, "--step-sleep", "0.05"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert first.stdout is not None
    assert first.stdout.readline().strip() == "training", first.communicate()[1][-3000:]
    time.sleep(1.0)
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    assert first.returncode != 0, err[-3000:]
    (run,) = mlflow.search_runs(
        filter_string=f"tags.`{tags.RUN_KEY}` = 'evicted-pod'", output_format="list"
    )
    saved = mlflow_ckpt.latest_checkpoint(run.info.run_id)
    assert saved.triggers == (tags.PREEMPTED,) and 2 < saved.step < 199, saved
    assert err.count("SIGTERM: saved step") == 2  # each rank saved (its part of) the step
    second = subprocess.run(
        [*cmd, str(JOB), "--out", str(tmp_path / "second"), *common],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert [r["start_step"] for r in reports(tmp_path / "second")] == [saved.step + 1] * 2
    assert {r["run_id"] for r in reports(tmp_path / "second")} == {run.info.run_id}

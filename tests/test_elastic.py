"""``torchrun --max-restarts``: after a rank dies (SIGKILL) or is preempted (SIGTERM), torchrun
restarts every worker and, with ``resume="auto"``, they continue the same MLflow run from
the newest commit, bit for bit against an uninterrupted job (DDP and FSDP2, gloo, 2 ranks).

No run name is given: the job's key is ``TORCHELASTIC_RUN_ID``, the same for every restart
of one ``torchrun``. The job initializes its group on a store prefixed by the restart
attempt (``tests/dist_job.py::init_process_group``), without which torch 2.13's restarted
attempts fail to connect in about half the runs.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from safetensors.torch import load_file

import mlflow_ckpt
from mlflow_ckpt.catalog import tags
from tests.distlib import reports, torchrun
from tests.test_distributed import assert_same

pytestmark = pytest.mark.slow
RESTARTS = ("--max-restarts=2",)


def _straight(strategy: str, out: Path) -> None:
    torchrun(2, out, "--strategy", strategy, "--steps", "8", "--save-every", "3", "--auto")


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


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_a_rank_killed_mid_run_is_restarted_and_the_job_ends_bit_for_bit(
    tracking: str, tmp_path: Path, strategy: str
) -> None:
    _straight(strategy, tmp_path / "straight")
    common = ["--strategy", strategy, "--steps", "8", "--save-every", "3", "--auto"]
    job = torchrun(
        2, tmp_path / "job", *common, "--first-attempt-kill", "1:6", torchrun_args=RESTARTS
    )
    assert job.returncode == 0
    done = reports(tmp_path / "job")
    assert [r["attempt"] for r in done] == [1, 1]  # what finished is the restarted attempt
    assert [r["start_step"] for r in done] == [6, 6]  # from step 5's commit (every 3: 2, 5)
    _assert_bit_for_bit(tmp_path / "straight", tmp_path / "job")
    run_id = done[0]["run_id"]
    assert len(_job_runs(run_id)) == 1  # one MLflow run for the whole job
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run_id)] == [7, 5, 2]


def test_one_rank_preempted_makes_every_rank_save_that_step_then_the_restart_continues(
    tracking: str, tmp_path: Path
) -> None:
    _straight("ddp", tmp_path / "straight")
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
    _assert_bit_for_bit(tmp_path / "straight", tmp_path / "job")
    assert len(_job_runs(run_id)) == 1

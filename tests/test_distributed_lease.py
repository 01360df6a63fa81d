"""A distributed job that lost its writer lease stops on every rank, whatever ``on_error``.

The run is taken over (as ``force=True`` by another process would) between two saves of a
real 2-rank torchrun job; ``on_error="warn"`` must not turn that into a warning on any rank:
going on would write a run another process owns.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

import mlflow_ckpt
from mlflow_ckpt.manager.lease import read_lease
from tests.distlib import ROOT, reports

pytestmark = pytest.mark.slow


def test_a_lost_lease_raises_writer_conflict_on_every_rank_even_with_on_error_warn(
    tracking: str, tmp_path: Path, other_process: int
) -> None:
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow.get_tracking_uri(), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(ROOT / "tests" / "takeover_job.py"), "--out", str(tmp_path)]
    cmd += ["--other-pid", str(other_process)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-12000:]
    ranks = reports(tmp_path)
    assert len(ranks) == 2
    for mode in ("sync", "async"):
        run_id = ranks[0][mode]["run_id"]
        for rank, report in enumerate(ranks):
            calls = report[mode]
            # The first save after the takeover raises on every rank, and so does the next.
            for call in ("step1", "step2"):
                assert calls[call]["raised"] == "WriterConflictError", (mode, rank, call, calls)
                assert "was taken over by process" in calls[call]["message"]
                assert run_id in calls[call]["message"]
                assert calls[call]["warned"] is None, (mode, rank, call)
        # Nothing after the takeover point was committed by the job.
        assert [c.step for c in mlflow_ckpt.list_checkpoints(run_id)] == [0], mode
        # ... and the job left the taker's lease alone (no heartbeat over it, no release).
        client = MlflowClient()
        lease = read_lease(client, run_id, client.get_run(run_id).info.experiment_id)
        assert lease is not None and lease.owner == "operator-forced", (mode, lease)

"""kill -9 at random moments, async and sync: every restart resumes from the newest commit.

The async chain saves incrementally with a frozen layer (edited every few steps) and keeps
self-contained milestones that a background job archives, so kills also land while saves
reference shared bytes, while a milestone is written whole (the save after it starting a
new group) or archived, and while retention releases old groups; its final
check includes the run's shared area holding exactly what the checkpoints reference. The
sync chain keeps milestones and archives old ones (a manifest swap), so kills land there;
it restarts the identical command (``resume="auto"``), so kills also land while a job
starts its run or a restart finds it by key.

``MLFLOW_CKPT_CRASH_TRIALS`` (default 12 per variant, 24 in all) sets the number of kills.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests import crashlib

TRIALS = int(os.environ.get("MLFLOW_CKPT_CRASH_TRIALS", "12"))


@pytest.mark.slow
def test_random_sigkills_lose_nothing(tmp_path: Path, _template_db: Path) -> None:
    variants = {"async": False, "sync": True}
    uris = {name: crashlib.prepare(tmp_path / name, _template_db) for name in variants}
    # Both chains at once: a kill lands while another process also writes (2 cores).
    with ThreadPoolExecutor(2) as pool:
        futures = {
            name: pool.submit(
                crashlib.run_chain,
                tmp_path / name,
                uris[name],
                trials=TRIALS,
                seed=1000 + index,
                sync=sync,
                # async: incremental saves referencing a frozen layer that changes now and
                # then, so kills land while shared bytes are referenced and released too
                # sync: old milestones archived (recompressed in place) as retention runs
                # sync: also the identical command each time (resume="auto": no run ID), so
                # kills land while a restart looks its run up by key and takes the lease
                child_env=(
                    {"MLFLOW_CKPT_CRASH_ARCHIVE": "1", "MLFLOW_CKPT_CRASH_AUTO": "1"}
                    if sync
                    else {"MLFLOW_CKPT_CRASH_FROZEN": "1"}
                ),
            )
            for index, (name, sync) in enumerate(variants.items())
        }
        results = {name: future.result() for name, future in futures.items()}
    for name, result in results.items():
        assert result.problems == [], (name, result.problems)
        assert result.trials == TRIALS and result.survived == TRIALS and result.lost == 0
        assert result.final_checkpoints >= 1, name

"""Fault-injection benchmark: N trials of each fault the reliability guarantees cover.

Every trial uses a fresh MLflow tracking store (sqlite, copied from one template database)
and real storage; nothing is mocked. The faults, and what *survived* means for each:

* ``kill9-async`` / ``kill9-sync``: a chain of training processes (``tests.crashlib``), each
  SIGKILLed at a seeded random moment (during resume, a snapshot, a file write, a commit or
  a retention deletion) while saving every step, asynchronously or synchronously. Survived:
  the restart resumes from the newest committed checkpoint. At the end ``mlflow-ckpt gc`` and
  a last uninterrupted run must leave every listed checkpoint verifying and loading, nothing
  PENDING and no temporary file (a failure there is reported under the row).
* ``corrupt-flip-byte``, ``corrupt-truncate``, ``corrupt-delete``: one byte of a tensor
  shard flipped, a shard truncated, a shard deleted, in the newest of two committed
  checkpoints. ``corrupt-manifest-edit``: a metric value or the step in ``manifest.json``
  changed (the digest tag ``mlflow_ckpt.manifest_sha256`` recorded at commit must catch it).
  ``corrupt-swap-files``: the contents of two files listed in the manifest swapped.
  Survived: ``mlflow_ckpt.load`` raises ``CheckpointCorruptedError`` and leaves the target
  untouched, ``verify_checkpoint`` reports it, ``CheckpointManager.resume`` falls back to the
  older checkpoint (and restores its exact weights), the bad one is tagged
  ``mlflow_ckpt.status=corrupt`` and is no longer listed.
* ``full-disk``: the artifact store is an 8 MiB tmpfs (needs root; the row says
  "skipped: <reason>" when it cannot be mounted). After one save the disk is filled; the next
  save (sync and async alternate) must raise ``CheckpointWriteError`` saying "no space left",
  nothing but the first checkpoint's files may remain, that checkpoint must still load, and
  once space is freed the next save commits.
* ``dead-network``: S3 (a moto server) behind ``tests.faultproxy.FaultProxy``; the endpoint
  dies 1 MiB into an upload. The save (sync and async alternate) must fail with
  ``CheckpointWriteError`` after its retries, ``list_checkpoints`` must not list it, the
  previous checkpoint stays listed, and once the endpoint is back the next save commits
  and loads.
* ``kill9-distributed``: a 2-rank FSDP2 job under ``torchrun`` saving every step (sync and
  async alternate) loses a random rank to SIGKILL at a random moment; a 2-rank resume must
  continue from the newest commit and finish, every listed checkpoint must verify, and
  nothing PENDING, partial or temporary may remain.
* ``corrupt-distributed``: one byte flipped in a random rank's file of the newest of two
  2-rank checkpoints; a 2-rank resume must fall back to the older one exactly.
* ``kill9-compressed`` and ``corrupt-flip-byte-compressed``: the ``kill9-async`` and
  ``corrupt-flip-byte`` rows with ``compression="zstd"`` checkpoints.
* ``kill9-incremental``: the ``kill9-async`` row with a frozen first layer (edited in place
  every 5 steps) and a milestone every 6 steps (written self-contained, the save after it
  starting a new group; archived, by a background job, once older than the 2 newest
  checkpoints): saves reference its bytes in the run's shared area, retention
  releases groups no kept checkpoint references; at the end the shared area must hold
  exactly the groups the checkpoints reference.
* ``kill9-archive``: the ``kill9-sync`` row keeping every 4th step as a milestone and
  archiving those older than the newest (``archive_after_n=1``: recompressed in place, a
  manifest swap), so kills also land in the middle of an archive.
* ``corrupt-shared-incremental``: incremental saves of a net with a frozen layer and a
  milestone every 3 steps; one bit flipped in the shared group the newest checkpoint wrote.
  Resume must fall back to the newest milestone (self-contained) exactly, tag the damaged
  checkpoint corrupt, and a checkpoint referencing another group must still load.
* ``kill9-auto``: the ``kill9-async`` row restarting the identical command
  (``resume="auto"``: no run ID; the run found by its key), so kills also land while a job
  starts its run or a restart looks it up and takes its lease.
* ``sigterm-preempt``: one job (``tests.train_script auto``) SIGTERMed at a seeded random
  moment and restarted with the identical command, N times, then run to its end. Survived:
  the process ended by SIGTERM (exit status -15) after committing the step it was at
  (trigger ``preempted``), and the restart began at the step after it: zero steps lost. The
  finished run must equal an uninterrupted one bit for bit (reported under the row if not).
* ``elastic-restart``: ``torchrun --max-restarts=2`` of a 2-rank DDP job with
  ``resume="auto"`` (key ``TORCHELASTIC_RUN_ID``), a random rank SIGKILLed at a random step of
  the first attempt. Survived: the restarted workers continue the one run from its newest
  commit and end bit for bit with an uninterrupted job.
* ``kill9-fork``: ``mlflow-ckpt fork`` of a run with 5,000 metric points SIGKILLed at a
  seeded random moment (starting, copying the history, or done). Survived: the source's
  history is unchanged, a half-copied fork is refused by ``CheckpointManager.resume``, a
  fork tagged ready holds the source's history up to the step exactly, and the same fork
  run again deletes the half-copied one (only complete forks remain visible).
* ``kill9-average``: ``mlflow-ckpt average`` of three 16 MB checkpoints SIGKILLed at a
  seeded random moment, then ``mlflow-ckpt gc`` of the run. Survived: the run's checkpoints
  are unchanged, an average that is not committed never resolves, a committed one (also one
  that recovery committed because its manifest was complete) is exactly the mean, and no
  half-made average is left after ``gc``.
* ``hostile-pickle``: a ``format="torch"`` checkpoint whose tensor file is replaced by a
  pickle whose ``__reduce__`` creates a marker file (``os.system``, ``exec``, or a legacy
  bare pickle, in turn), with the manifest and its digest tag re-signed so every hash
  matches. Survived: ``load`` and ``load_training_state`` raise ``CheckpointError``, resume
  falls back to the older checkpoint, and the marker never appears.

Columns: ``trials`` run; ``survived``: the guarantee above held; ``lost``: a committed
checkpoint became unusable or disappeared, a partial or corrupt checkpoint was silently
accepted (loaded, verified or listed), or a payload executed. A trial can be neither (for
example an unclear error type): it then did not survive and is described under the table.
The exit code is 1 if any trial did not survive.

    python benchmarks/faults.py [--trials N] [--seed S] [--only NAME ...]

Without ``--trials``: 5 trials per fault, 10 kills per kill -9 chain.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # MLflow's download bars
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import boto3
import mlflow
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

import mlflow_ckpt
from mlflow_ckpt.catalog import resolve
from mlflow_ckpt.catalog.reader import verify_checkpoint
from mlflow_ckpt.catalog.shared import shared_area_uri
from mlflow_ckpt.storage import RetryPolicy, TransferConfig, local_path_of
from mlflow_ckpt.storage.local import TEMP_MARKER
from tests import crashlib, forkcrash, servers, tinydisk
from tests.conftest import BUCKET, ROOT, _aws_kwargs, s3_env
from tests.faultproxy import FaultProxy, fault_proxy
from tests.test_hostile import evil_torch_file, resign, shard_of

MB = 1 << 20
SURVIVED, LOST, FAILED = "survived", "lost", "failed"


class Lost(Exception):
    """A guarantee broke in a way that loses data or accepts bad data."""


class Failed(Exception):
    """A guarantee broke without losing data (unclear error, leftovers...)."""


@dataclass
class Row:
    fault: str
    meaning: str
    trials: int = 0
    survived: int = 0
    lost: int = 0
    skipped: str = ""
    problems: list[str] = field(default_factory=list)

    def add(self, trial: int, outcome: str, problem: str = "") -> None:
        self.trials += 1
        self.survived += outcome == SURVIVED
        self.lost += outcome == LOST
        if problem:
            self.problems.append(f"trial {trial}: {outcome}: {problem}")

    @property
    def ok(self) -> bool:
        return bool(self.skipped) or (self.survived == self.trials and not self.problems)


# ---------------------------------------------------------------- per-trial environment


class Bench:
    """The scratch directory, the template tracking database and the options."""

    def __init__(self, scratch: Path, seed: int) -> None:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        self.scratch = scratch
        self.seed = seed
        template = scratch / "template"
        template.mkdir()
        self.template_db = template / "mlflow.db"
        SqlAlchemyStore(f"sqlite:///{self.template_db}", str(template / "mlruns"))
        self._count = 0

    def workdir(self, name: str) -> Path:
        self._count += 1
        path = self.scratch / f"{self._count:03d}-{name}"
        path.mkdir()
        return path

    def tracking(self, workdir: Path, artifact_location: str | None = None) -> str:
        """A fresh tracking store in ``workdir``; returns the ID of an experiment in it."""
        db = workdir / "mlflow.db"
        shutil.copy(self.template_db, db)
        mlflow.set_tracking_uri(f"sqlite:///{db}")
        return mlflow.create_experiment(
            "faults", artifact_location=artifact_location or str(workdir / "artifacts")
        )


def _end_runs() -> None:
    while mlflow.active_run() is not None:
        mlflow.end_run()


def run_trials(
    row: Row, trials: int, trial: Callable[[int], None], after: Callable[[], None] | None = None
) -> None:
    for i in range(trials):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trial(i)
        except Lost as exc:
            row.add(i, LOST, str(exc))
        except Failed as exc:
            row.add(i, FAILED, str(exc))
        except Exception as exc:  # an unexpected error: the guarantee did not hold
            tb = traceback.format_exc(limit=6)
            row.add(i, FAILED, f"unexpected {type(exc).__name__}: {exc}\n{tb}")
        else:
            row.add(i, SURVIVED)
        finally:
            _end_runs()
            if after is not None:
                after()
    mlflow.set_tracking_uri(None)


# ---------------------------------------------------------------- kill -9


def kill9(
    bench: Bench,
    row: Row,
    trials: int,
    sync: bool,
    compression: str = "",
    frozen: bool = False,
    archive: bool = False,
    auto: bool = False,
) -> None:
    workdir = bench.workdir(row.fault)
    uri = crashlib.prepare(workdir, bench.template_db)
    env = {"MLFLOW_CKPT_CRASH_COMPRESSION": compression}  # read by tests/crash_child.py
    if frozen:
        env["MLFLOW_CKPT_CRASH_FROZEN"] = "1"
    if archive:
        env["MLFLOW_CKPT_CRASH_ARCHIVE"] = "1"
    if auto:
        env["MLFLOW_CKPT_CRASH_AUTO"] = "1"
    result = crashlib.run_chain(
        workdir,
        uri,
        trials=trials,
        seed=bench.seed + (1 if sync else 0),
        sync=sync,
        child_env=env,
    )
    mlflow.set_tracking_uri(None)
    row.trials, row.survived, row.lost = result.trials, result.survived, result.lost
    row.problems += result.problems
    if result.final_checkpoints < 1:
        row.problems.append("the final run listed no checkpoint")


# ---------------------------------------------------------------- corruption


def _net(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return {"model": model, "opt": opt}


def _train_step(state: dict[str, Any]) -> None:
    model, opt = state["model"], state["opt"]
    opt.zero_grad()
    model(torch.randn(16, 32)).pow(2).mean().backward()
    opt.step()


def _weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state["model"].state_dict().items()}


def _same(state: dict[str, Any], weights: dict[str, torch.Tensor]) -> bool:
    now = state["model"].state_dict()
    return now.keys() == weights.keys() and all(torch.equal(now[k], weights[k]) for k in now)


def _two_checkpoints(
    bench: Bench, name: str, seed: int, **kwargs: Any
) -> tuple[Path, str, dict[str, torch.Tensor], list[mlflow_ckpt.Checkpoint]]:
    """A run with checkpoints at steps 0 and 1; returns workdir, run ID, step-0 weights, list."""
    workdir = bench.workdir(name)
    exp = bench.tracking(workdir)
    state = _net(seed)
    with mlflow.start_run(experiment_id=exp) as run:
        with mlflow_ckpt.CheckpointManager(
            state, async_save=False, save_last=False, **kwargs
        ) as mgr:
            _train_step(state)
            mgr.save(0, {"loss": 1.0})
            first = _weights(state)
            _train_step(state)
            mgr.save(1, {"loss": 0.5})
    ckpts = mlflow_ckpt.list_checkpoints(run.info.run_id)
    if [c.step for c in ckpts] != [1, 0]:
        raise Failed(f"setup: expected checkpoints [1, 0], got {[c.step for c in ckpts]}")
    return workdir, run.info.run_id, first, ckpts


def _resumed_step(run_id: str, state: dict[str, Any]) -> int | None:
    """Resume ``run_id`` into ``state`` and close again; the step it resumed from."""
    mgr = mlflow_ckpt.CheckpointManager.resume(run_id, state, save_last=False)
    try:
        return mgr.resumed_from.step if mgr.resumed_from else None
    finally:
        mgr.close()
        mlflow.end_run()


def _flip_byte(folder: Path, manifest: dict[str, Any], rng: random.Random) -> str:
    shard = rng.choice(sorted(folder.glob("tensors-*")))
    data = bytearray(shard.read_bytes())
    pos = rng.randrange(len(data))
    data[pos] ^= 1 << rng.randrange(8)
    shard.write_bytes(bytes(data))
    return f"flipped a bit of byte {pos} of {shard.name}"


def _truncate(folder: Path, manifest: dict[str, Any], rng: random.Random) -> str:
    shard = rng.choice(sorted(folder.glob("tensors-*")))
    size = shard.stat().st_size
    keep = rng.randrange(size)
    with open(shard, "r+b") as f:
        f.truncate(keep)
    return f"truncated {shard.name} from {size} to {keep} bytes"


def _delete(folder: Path, manifest: dict[str, Any], rng: random.Random) -> str:
    shard = rng.choice(sorted(folder.glob("tensors-*")))
    shard.unlink()
    return f"deleted {shard.name}"


def _edit_manifest(folder: Path, manifest: dict[str, Any], rng: random.Random) -> str:
    path = folder / "manifest.json"
    if rng.random() < 0.5:
        manifest["metrics"]["loss"] = round(rng.uniform(0.0, 0.4), 3)
        what = f"metrics.loss -> {manifest['metrics']['loss']}"
    else:
        manifest["step"] = rng.choice([0, 2, 7, 1000])
        what = f"step -> {manifest['step']}"
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return f"edited manifest.json ({what}), digest tag left as committed"


def _swap(folder: Path, manifest: dict[str, Any], rng: random.Random) -> str:
    a, b = rng.sample(sorted(f["path"] for f in manifest["files"]), 2)
    da, db = (folder / a).read_bytes(), (folder / b).read_bytes()
    (folder / a).write_bytes(db)
    (folder / b).write_bytes(da)
    return f"swapped the contents of {a} and {b}"


CORRUPTIONS: dict[str, Callable[[Path, dict[str, Any], random.Random], str]] = {
    "corrupt-flip-byte": _flip_byte,
    "corrupt-truncate": _truncate,
    "corrupt-delete": _delete,
    "corrupt-manifest-edit": _edit_manifest,
    "corrupt-swap-files": _swap,
}


def corruption(bench: Bench, row: Row, trials: int) -> None:
    corrupt = CORRUPTIONS[row.fault.removesuffix("-compressed")]
    compressed = {"compression": "zstd"} if row.fault.endswith("-compressed") else {}

    def trial(i: int) -> None:
        seed = bench.seed * 1000 + i
        rng = random.Random(f"{row.fault}-{seed}")
        # several shards, so the corruption lands in a seeded one
        _, run_id, first, (newest, older) = _two_checkpoints(
            bench, row.fault, seed, max_shard_bytes=8 * 1024, **compressed
        )
        folder = Path(newest.artifact_location)
        what = corrupt(folder, json.loads((folder / "manifest.json").read_text()), rng)
        client = MlflowClient()

        target = _net(seed + 1)
        before = _weights(target)
        try:
            mlflow_ckpt.load(newest, target)
        except mlflow_ckpt.CheckpointCorruptedError:
            pass
        except Exception as exc:
            raise Failed(f"{what}: load raised {type(exc).__name__}: {exc}") from exc
        else:
            raise Lost(f"{what}: load accepted the corrupt checkpoint")
        if not _same(target, before):
            raise Lost(f"{what}: a failed load changed the target's weights")

        if not verify_checkpoint(resolve(newest, client)):
            raise Lost(f"{what}: verify_checkpoint reported no problem")

        fresh = _net(seed + 2)
        got = _resumed_step(run_id, fresh)
        listed = [c.step for c in mlflow_ckpt.list_checkpoints(run_id)]
        if got != 0:
            raise Lost(f"{what}: resume picked step {got}, expected the fallback to step 0")
        if not _same(fresh, first):
            raise Lost(f"{what}: resume restored other weights than step 0's")
        status = client.get_logged_model(newest.model_id).tags.get("mlflow_ckpt.status")
        if status != "corrupt":
            raise Failed(f"{what}: the corrupt checkpoint is tagged status={status!r}")
        if listed != [0]:
            raise Lost(f"{what}: after resume list_checkpoints gives {listed}, expected [0]")
        mlflow_ckpt.load(older, _net(seed + 3))  # the older one still loads

    run_trials(row, trials, trial)


def corrupt_shared(bench: Bench, row: Row, trials: int) -> None:
    """Incremental saves of a net with a frozen first layer, one per step (0-6), the last 3
    kept and a milestone every 3 steps (2 and 5, self-contained); sync and async alternate.
    One bit is flipped in a random file of the shared group the newest checkpoint (step 6)
    wrote. Survived: loading step 6 raises ``CheckpointCorruptedError`` and leaves the target
    untouched, resume falls back to the milestone of step 5 exactly and tags step 6 corrupt,
    and step 4 (another group) still loads."""

    def trial(i: int) -> None:
        seed = bench.seed * 1000 + i
        rng = random.Random(f"{row.fault}-{seed}")
        exp = bench.tracking(bench.workdir(row.fault))
        state = _net(seed)
        frozen = _frozen_first_layer(state)
        weights = {}
        with mlflow.start_run(experiment_id=exp) as run:
            with mlflow_ckpt.CheckpointManager(
                frozen, keep_last_n=3, keep_every_n_steps=3, async_save=i % 2 == 1
            ) as mgr:
                for step in range(7):
                    _train_step(frozen)
                    mgr.save(step, {"loss": 1.0 / (step + 1)})
                    weights[step] = _weights(frozen)
        run_id = run.info.run_id
        kept = {c.step: c for c in mlflow_ckpt.list_checkpoints(run_id)}
        if sorted(kept) != [2, 4, 5, 6]:
            raise Failed(f"setup: expected checkpoints 2, 4, 5, 6, got {sorted(kept)}")
        newest, milestone = kept[6], kept[5]
        if milestone.shared or newest.shared != (newest.model_id,):
            raise Lost(f"milestone 5 references {milestone.shared}, step 6 {newest.shared}")
        area = local_path_of(shared_area_uri(MlflowClient().get_run(run_id).info.artifact_uri))
        assert area is not None
        victim = rng.choice(sorted(p for p in (area / newest.model_id).rglob("*") if p.is_file()))
        data = bytearray(victim.read_bytes())
        pos = rng.randrange(len(data))
        data[pos] ^= 1 << rng.randrange(8)
        victim.write_bytes(bytes(data))
        what = f"flipped a bit of byte {pos} of shared {victim.name}"

        target = _frozen_first_layer(_net(seed + 1))
        before = _weights(target)
        try:
            mlflow_ckpt.load(newest, target)
        except mlflow_ckpt.CheckpointCorruptedError:
            pass
        else:
            raise Lost(f"{what}: load accepted the corrupt checkpoint")
        if not _same(target, before):
            raise Lost(f"{what}: a failed load changed the target's weights")
        fresh = _frozen_first_layer(_net(seed + 2))
        got = _resumed_step(run_id, fresh)
        if got != 5 or not _same(fresh, weights[5]):
            raise Lost(f"{what}: resume restored step {got}, not the milestone of step 5")
        status = MlflowClient().get_logged_model(newest.model_id).tags.get("mlflow_ckpt.status")
        if status != "corrupt":
            raise Failed(f"{what}: the corrupt checkpoint is tagged status={status!r}")
        other = _frozen_first_layer(_net(seed + 3))
        mlflow_ckpt.load(kept[4], other)  # its group is another one
        if not _same(other, weights[4]):
            raise Lost(f"{what}: step 4 no longer restores its own weights")

    run_trials(row, trials, trial)


def _frozen_first_layer(state: dict[str, Any]) -> dict[str, Any]:
    model = state["model"]
    model[0].requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {"model": model, "opt": torch.optim.AdamW(trainable, lr=1e-2)}


# ---------------------------------------------------------------- full disk


def full_disk(bench: Bench, row: Row, trials: int) -> None:
    try:  # can a tmpfs be mounted at all?
        with tinydisk.tmpfs(bench.workdir("full-disk-probe") / "tiny"):
            pass
    except RuntimeError as exc:
        row.skipped = f"skipped: {exc}"
        return

    def trial(i: int) -> None:
        workdir = bench.workdir(row.fault)
        async_save = i % 2 == 1
        mode = "async" if async_save else "sync"
        with tinydisk.tmpfs(workdir / "tiny") as disk:
            exp = bench.tracking(workdir, str(disk / "artifacts"))
            state = tinydisk.training_state(bench.seed * 1000 + i)
            with mlflow.start_run(experiment_id=exp) as run:
                mgr = mlflow_ckpt.CheckpointManager(
                    state, save_every_n_steps=1, keep_last_n=1, async_save=async_save
                )
                try:
                    _full_disk_steps(mgr, state, disk, run.info.run_id, mode)
                finally:
                    with contextlib.suppress(Exception):
                        mgr.close()
            listed = [c.step for c in mlflow_ckpt.list_checkpoints(run.info.run_id)]
            if listed != [2]:
                raise Failed(f"{mode}: after space came back the run lists {listed}, not [2]")
            restored = tinydisk.training_state(0)
            mlflow_ckpt.load(mlflow_ckpt.latest_checkpoint(run.info.run_id), restored)
            if not torch.equal(restored["model"].weight, state["model"].weight):
                raise Lost(f"{mode}: the step-2 checkpoint restored other weights")

    run_trials(row, trials, trial)


def _full_disk_steps(
    mgr: mlflow_ckpt.CheckpointManager, state: dict[str, Any], disk: Path, run_id: str, mode: str
) -> None:
    mgr.step(0, {"loss": 1.0})
    mgr.wait()
    first = mlflow_ckpt.latest_checkpoint(run_id)
    if first is None or first.step != 0:
        raise Failed(f"{mode}: setup: the first save did not commit")
    before = tinydisk.files(disk)
    weights = state["model"].weight.detach().clone()
    filler = tinydisk.fill(disk, leave=1 * MB)  # a checkpoint needs ~3 MiB
    try:
        with torch.no_grad():
            state["model"].weight.add_(1.0)
        mgr.step(1, {"loss": 0.9})
        mgr.wait()
    except mlflow_ckpt.CheckpointWriteError as exc:
        if "no space left" not in str(exc).lower():
            raise Failed(f"{mode}: CheckpointWriteError without 'no space left': {exc}") from exc
    except Exception as exc:
        raise Failed(f"{mode}: the full disk gave {type(exc).__name__}: {exc}") from exc
    else:
        raise Failed(f"{mode}: the save on a full disk raised nothing")
    listed = [c.step for c in mlflow_ckpt.list_checkpoints(run_id)]
    if 1 in listed:
        raise Lost(f"{mode}: the failed save of step 1 is listed: {listed}")
    if listed != [0]:
        raise Lost(f"{mode}: after the failed save the run lists {listed}, not [0]")
    restored = tinydisk.training_state(99)
    try:
        mlflow_ckpt.load(first, restored)
    except Exception as exc:
        raise Lost(f"{mode}: step 0 no longer loads: {type(exc).__name__}: {exc}") from exc
    if not torch.equal(restored["model"].weight, weights):
        raise Lost(f"{mode}: step 0 restored other weights")
    after = tinydisk.files(disk)
    if after != before or any(TEMP_MARKER in p.name for p in disk.rglob("*")):
        extra = sorted(str(p.relative_to(disk)) for p in set(after) - set(before))
        raise Failed(f"{mode}: files besides step 0's remain: {extra[:5]}")
    filler.unlink()
    mgr.step(2, {"loss": 0.8})
    mgr.wait()


# ---------------------------------------------------------------- dead network


@contextlib.contextmanager
def s3_behind_proxy() -> Iterator[FaultProxy]:
    """A moto S3 server with bucket "ckpt", reached through a FaultProxy (env vars set)."""
    saved = dict(os.environ)
    with servers.running(servers.start_s3()) as server:
        boto3.client("s3", endpoint_url=server.url, **_aws_kwargs()).create_bucket(Bucket=BUCKET)
        with fault_proxy(server.port) as proxy:
            os.environ.update(s3_env(proxy.url))
            # no SDK-level retries: what is retried is retried by mlflow_ckpt
            os.environ.update(AWS_MAX_ATTEMPTS="1", AWS_RETRY_MODE="standard")
            try:
                yield proxy
            finally:
                os.environ.clear()
                os.environ.update(saved)


def dead_network(bench: Bench, row: Row, trials: int) -> None:
    transfer = TransferConfig(retry=RetryPolicy(attempts=4, base=0.05, cap=0.2), progress=False)
    with s3_behind_proxy() as proxy:

        def trial(i: int) -> None:
            async_save = i % 2 == 1
            mode = "async" if async_save else "sync"
            workdir = bench.workdir(row.fault)
            exp = bench.tracking(workdir, f"s3://{BUCKET}/faults-{time.time_ns()}")
            torch.manual_seed(bench.seed * 1000 + i)
            state = {"w": torch.randn(6 * MB // 4)}  # 6 MB in 2 MB shards
            with mlflow.start_run(experiment_id=exp) as run:
                mgr = mlflow_ckpt.CheckpointManager(
                    state, async_save=async_save, transfer=transfer, max_shard_bytes=2 * MB
                )
                try:
                    _dead_network_steps(mgr, proxy, run.info.run_id, mode)
                    mgr.save(2)  # the endpoint is back
                    mgr.close()
                finally:
                    with contextlib.suppress(Exception):
                        mgr.close()  # idempotent; after a failure only stops the worker
            run_id = run.info.run_id
            listed = [c.step for c in mlflow_ckpt.list_checkpoints(run_id)]
            if listed != [2, 0]:
                raise Failed(f"{mode}: after the endpoint came back the run lists {listed}")
            for ckpt in mlflow_ckpt.list_checkpoints(run_id):
                restored = {"w": torch.zeros_like(state["w"])}
                try:
                    mlflow_ckpt.load(ckpt, restored)
                except Exception as exc:
                    raise Lost(f"{mode}: step {ckpt.step} does not load: {exc}") from exc
                if not torch.equal(restored["w"], state["w"]):
                    raise Lost(f"{mode}: step {ckpt.step} restored other values")

        run_trials(row, trials, trial, after=lambda: None if not proxy.is_down else proxy.up())


def _dead_network_steps(
    mgr: mlflow_ckpt.CheckpointManager, proxy: FaultProxy, run_id: str, mode: str
) -> None:
    mgr.save(0)
    mgr.wait()
    proxy.down_after(1 * MB)
    try:
        mgr.save(1)
        mgr.wait()  # async: the failure surfaces here
    except mlflow_ckpt.CheckpointWriteError as exc:
        if "step 1" not in str(exc) or run_id not in str(exc):
            raise Failed(f"{mode}: the error does not name the run and step: {exc}") from exc
    except Exception as exc:
        raise Failed(f"{mode}: the dead endpoint gave {type(exc).__name__}: {exc}") from exc
    else:
        raise Failed(f"{mode}: the save through a dead endpoint raised nothing")
    finally:
        was_down = proxy.is_down
        if was_down:
            proxy.up()
    if not was_down:
        raise Failed(f"{mode}: the endpoint never went down (upload smaller than 1 MiB?)")
    listed = [c.step for c in mlflow_ckpt.list_checkpoints(run_id)]
    if 1 in listed:
        raise Lost(f"{mode}: the failed save of step 1 is listed: {listed}")
    if listed != [0]:
        raise Lost(f"{mode}: after the failed save the run lists {listed}, not [0]")


# ---------------------------------------------------------------- hostile pickle


def hostile_pickle(bench: Bench, row: Row, trials: int) -> None:
    kinds = ("system", "exec", "legacy")
    control = bench.workdir("hostile-control")
    for kind in kinds:  # control: the payloads do run when unpickled the unsafe way
        data = evil_torch_file(control / kind, kind)
        if kind == "legacy":
            pickle.loads(data)  # the point of the control
        else:
            torch.load(io.BytesIO(data), weights_only=False)
        if not (control / kind).exists():
            row.problems.append(f"control: the {kind} payload did not run when unpickled")

    def trial(i: int) -> None:
        seed = bench.seed * 1000 + i
        kind = kinds[i % len(kinds)]
        workdir, run_id, first, (newest, _) = _two_checkpoints(
            bench, row.fault, seed, format="torch"
        )
        marker = workdir / "PWNED"
        folder = Path(newest.artifact_location)
        shard = shard_of(folder)
        resign(folder, {shard.name: evil_torch_file(marker, kind)})
        what = f"{kind} payload in {shard.name}"
        errors = []
        for name, call in (
            ("load", lambda: mlflow_ckpt.load(newest, _net(seed + 1))),
            ("load_training_state", lambda: mlflow_ckpt.load_training_state(newest.uri)),
        ):
            try:
                call()
            except mlflow_ckpt.CheckpointError:
                pass
            except Exception as exc:
                errors.append(f"{name} raised {type(exc).__name__}: {exc}")
            else:
                errors.append(f"{name} accepted it")
            if marker.exists():
                raise Lost(f"{what}: the payload executed during {name}")
        fresh = _net(seed + 2)
        got = _resumed_step(run_id, fresh)
        if marker.exists():
            raise Lost(f"{what}: the payload executed during resume")
        if got != 0 or not _same(fresh, first):
            raise Lost(f"{what}: resume picked step {got}, expected the fallback to step 0")
        if errors:
            raise Failed(f"{what}: " + "; ".join(errors))

    run_trials(row, trials, trial)


# ---------------------------------------------------------------- diverged state


def diverged_state(bench: Bench, row: Row, trials: int) -> None:
    """Weights (or an optimizer moment) turn NaN/inf at a random step of a run saving every
    step with keep_last_n=2: the newest listed checkpoint must be the last finite state, and
    resume must restore exactly it."""
    rng = random.Random(bench.seed + 7)

    def trial(i: int) -> None:
        workdir = bench.workdir(f"{row.fault}-{i}")
        exp = bench.tracking(workdir)
        state = _net(bench.seed + i)
        bad_step = rng.randrange(2, 8)
        poison = rng.choice(["nan-weight", "inf-weight", "nan-moment"])
        async_save = rng.random() < 0.5
        good: dict[str, torch.Tensor] = {}
        with mlflow.start_run(experiment_id=exp) as run:
            mgr = mlflow_ckpt.CheckpointManager(
                state, save_every_n_steps=1, keep_last_n=2, async_save=async_save
            )
            for step in range(10):
                _train_step(state)
                if step == bad_step:
                    with torch.no_grad():
                        if poison == "nan-moment":
                            moments = next(iter(state["opt"].state.values()))
                            moments["exp_avg"].view(-1)[0] = float("nan")
                        else:
                            value = float("nan") if poison == "nan-weight" else float("inf")
                            state["model"][0].weight.view(-1)[0] = value
                elif step < bad_step:
                    good = _weights(state)
                mgr.step(step, {"loss": 1.0})
            mgr.close()
        listed = [c.step for c in mlflow_ckpt.list_checkpoints(run.info.run_id)]
        if listed[:1] != [bad_step - 1]:
            raise Lost(f"{poison} at step {bad_step}: listed {listed}, last finite step lost")
        fresh = _net(bench.seed + 100 + i)
        resumed = mlflow_ckpt.CheckpointManager.resume(run.info.run_id, fresh)
        resumed.close()
        if resumed.start_step != bad_step or not _same(fresh, good):
            raise Lost(f"{poison} at step {bad_step}: resume did not restore the last finite state")

    run_trials(row, trials, trial)


# ---------------------------------------------------------------- distributed (torchrun)


def _dist_job_leftovers(root: Path, run_id: str) -> list[str]:
    """PENDING models, temporary files and orphaned folders under ``root`` after a resume."""
    from mlflow_ckpt.catalog import tags
    from mlflow_ckpt.storage.local import TEMP_MARKER

    client = MlflowClient()
    experiment = client.get_run(run_id).info.experiment_id
    problems = []
    statuses = [m.tags.get(tags.STATUS) for m in client.search_logged_models([experiment])]
    if tags.PENDING in statuses:
        problems.append(f"PENDING checkpoints left: {statuses}")
    temps = list(root.rglob(f"*{TEMP_MARKER}*"))
    if temps:
        problems.append(f"temporary files left: {temps[:3]}")
    live = {c.model_id for c in mlflow_ckpt.list_checkpoints(run_id)}
    for folder in (root / "models").iterdir():
        if folder.name not in live and any(p.is_file() for p in folder.rglob("*")):
            problems.append(f"files of uncommitted checkpoint {folder.name} remain")
    return problems


def _job_failure(stderr: str) -> str:
    """What a failed ``torchrun`` job said: each rank's Python exception or native abort
    (``terminate called``, gloo errors) first, torchrun's own summary after. The summary
    alone names a signal, not its cause."""
    lines = stderr.splitlines()
    causes = [
        line
        for i, line in enumerate(lines)
        if "terminate called" in line
        or "what():" in line
        or (line and not line.startswith(" ") and "Error" in line and i + 1 < len(lines))
    ]
    return "\n".join([*causes[-12:], "...", stderr[-1500:]])


def kill9_distributed(bench: Bench, row: Row, trials: int) -> None:
    """A 2-rank FSDP2 job (``torchrun``) saving every step loses one rank to SIGKILL at a
    seeded random moment (torchrun then stops the job). Survived: a 2-rank resume continues
    from the newest committed checkpoint and finishes; every listed checkpoint verifies;
    nothing PENDING, partial or temporary is left."""
    from mlflow_ckpt.catalog.reader import verify_checkpoint
    from tests.distlib import reports, torchrun

    rng = random.Random(bench.seed + 11)

    def trial(i: int) -> None:
        workdir = bench.workdir(f"{row.fault}-{i}")
        bench.tracking(workdir)
        root = workdir / "dist-artifacts"
        args = ["--steps", "400", "--save-every", "1", "--artifact-root", str(root)]
        args += ["--async-save"] if i % 2 else []
        kill = ["--kill-rank", str(rng.randrange(2)), "--kill-after", f"{rng.uniform(0.3, 3):.2f}"]
        first = torchrun(2, workdir / "first", *args, *kill, check=False)
        if first.returncode == 0:
            raise Failed("the job finished before the kill landed (raise --steps)")
        run_id = mlflow.search_runs(search_all_experiments=True).run_id[0]
        committed = [c.step for c in mlflow_ckpt.list_checkpoints(run_id)]
        until = str((committed[0] if committed else 0) + 4)
        resume = ["--steps", until, "--save-every", "1", "--resume", run_id]
        second = torchrun(2, workdir / "second", *resume, check=False)
        if second.returncode != 0:
            raise Failed(f"the resumed job failed: {_job_failure(second.stderr)}")
        starts = {r["start_step"] for r in reports(workdir / "second")}
        expected = committed[0] + 1 if committed else 0
        listed = {c.step for c in mlflow_ckpt.list_checkpoints(run_id)}
        # a save complete but not committed when the kill came is adopted by the resume
        start = starts.pop() if len(starts) == 1 else -1
        if start < expected or (start > 0 and start - 1 not in listed):
            raise Lost(f"resumed at {starts}, the newest commit was step {expected - 1}")
        for ckpt in mlflow_ckpt.list_checkpoints(run_id):
            problems = verify_checkpoint(resolve(ckpt, MlflowClient()))
            if problems:
                raise Lost(f"{ckpt.uri} (step {ckpt.step}) does not verify: {problems[0]}")
        leftovers = _dist_job_leftovers(root, run_id)
        if leftovers:
            raise Failed("; ".join(leftovers))

    run_trials(row, trials, trial)


def corrupt_distributed(bench: Bench, row: Row, trials: int) -> None:
    """One byte flipped in a random rank's shard (or own-state) file of the newest of two
    checkpoints written by 2 ranks. Survived: a 2-rank resume falls back to the older one
    and restores it exactly; the bad one is tagged corrupt and no longer listed."""
    from tests.distlib import reports, torchrun

    rng = random.Random(bench.seed + 13)

    def trial(i: int) -> None:
        workdir = bench.workdir(f"{row.fault}-{i}")
        bench.tracking(workdir)
        root = workdir / "dist-artifacts"
        args = ["--steps", "4", "--save-every", "2", "--artifact-root", str(root)]
        torchrun(2, workdir / "first", *args)
        run_id = mlflow.search_runs(search_all_experiments=True).run_id[0]
        newest, older = mlflow_ckpt.list_checkpoints(run_id)
        folder = Path(newest.artifact_location)
        victims = sorted(folder.glob("shards/rank-*.bin")) + sorted(folder.glob("ranks/*/*"))
        victim = rng.choice(victims)
        data = bytearray(victim.read_bytes())
        data[rng.randrange(len(data))] ^= 0xFF
        victim.write_bytes(bytes(data))
        second = torchrun(2, workdir / "second", "--steps", "2", "--resume", run_id, check=False)
        if second.returncode != 0:
            raise Failed(f"the resumed job failed: {_job_failure(second.stderr)}")
        if {r["start_step"] for r in reports(workdir / "second")} != {older.step + 1}:
            raise Lost(f"did not fall back to step {older.step} after {victim.name} was damaged")
        expected = load_file(workdir / "first" / f"saved-{older.step}.safetensors")
        got = load_file(workdir / "second" / "final.safetensors")
        if set(expected) != set(got) or not all(torch.equal(expected[k], got[k]) for k in got):
            raise Lost("the older checkpoint was not restored exactly")
        if newest.model_id in {c.model_id for c in mlflow_ckpt.list_checkpoints(run_id)}:
            raise Failed(f"{newest.uri} is still listed after failing verification")

    run_trials(row, trials, trial)


# ---------------------------------------------------------------- preemption


PREEMPT_STEPS = 2000  # more than the trials' signals interrupt (~100 steps a second)


def _job_env(key: str) -> dict[str, str]:
    """A child's environment: this trial's store, the job's key, no other identity."""
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow.get_tracking_uri(), MLFLOW_CKPT_RUN_KEY=key)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    for name in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "MLFLOW_EXPERIMENT_ID"):
        env.pop(name, None)
    return env


def _train_script(mode: str, out: Path, *extra: str) -> list[str]:
    steps = ["--steps", str(PREEMPT_STEPS), "--every", "25", "--out", str(out)]
    return [sys.executable, "-m", "tests.train_script", mode, *steps, *extra]


def _signalled_after(argv: list[str], env: dict[str, str], delay: float) -> tuple[int, list[str]]:
    """Run ``argv``; SIGTERM it ``delay`` s after it printed its start. Returns its exit code
    and its stdout lines."""
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    lines: list[str] = []
    while not lines or not lines[-1].startswith("resumed at"):
        line = proc.stdout.readline()
        if not line:
            raise Failed(f"the training never started: {proc.communicate()[1][-1500:]}")
        lines.append(line.strip())
    reader = threading.Thread(target=lambda: lines.extend(x.strip() for x in proc.stdout))
    reader.start()
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
    reader.join(timeout=30)
    return code, lines


def sigterm_preempt(bench: Bench, row: Row, trials: int) -> None:
    """One job (``resume="auto"``), SIGTERMed at a seeded random moment, then restarted with
    the identical command, ``trials`` times; then run to its end. Survived: the process ended
    by SIGTERM after committing the step it was at (trigger ``preempted``), and the restart
    continued from the step after it (zero steps lost). At the end the run's state must equal
    an uninterrupted run's bit for bit."""
    rng = random.Random(bench.seed + 17)
    workdir = bench.workdir(row.fault)
    bench.tracking(workdir)
    straight = workdir / "straight.pt"
    subprocess.run(
        _train_script("straight", straight),
        env=_job_env("straight"),
        check=True,
        capture_output=True,
    )
    env, out = _job_env("preempted-job"), workdir / "job.pt"
    argv = _train_script("auto", out, "--sleep", "0.01")
    expected_start = [0]

    def trial(i: int) -> None:
        code, lines = _signalled_after(argv, env, rng.uniform(0.2, 2.0))
        start = int(next(x for x in lines if x.startswith("resumed at")).split()[2])
        done = [int(x.split()[1]) for x in lines if x.startswith("step ")]
        if start != expected_start[0]:
            raise Lost(f"restart {i} began at step {start}, expected {expected_start[0]}")
        if code == 0:
            raise Failed("the job ended before the signal came (raise PREEMPT_STEPS)")
        if code != -signal.SIGTERM:
            raise Failed(f"exit status {code} (SIGTERM's would be {-signal.SIGTERM})")
        run_id = mlflow.search_runs(
            filter_string="tags.`mlflow_ckpt.run_key` = 'preempted-job'", output_format="list"
        )[0].info.run_id
        newest = mlflow_ckpt.latest_checkpoint(run_id)
        last = done[-1] if done else start - 1
        if newest is None or newest.step < last or "preempted" not in newest.triggers:
            raise Lost(f"signalled after step {last}; the newest checkpoint is {newest}")
        expected_start[0] = newest.step + 1

    run_trials(row, trials, trial)
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    final = subprocess.run(argv[:-2], env=env, capture_output=True, text=True)  # (no --sleep)
    if final.returncode != 0 or f"resumed at {expected_start[0]}" not in final.stdout:
        row.problems.append(f"the last restart failed or began elsewhere: {final.stderr[-1500:]}")
    elif not _same_dump(
        torch.load(out, weights_only=False), torch.load(straight, weights_only=False)
    ):
        row.problems.append("the preempted-and-restarted run did not end bit for bit")
    mlflow.set_tracking_uri(None)


def _same_dump(got: dict[str, Any], want: dict[str, Any]) -> bool:
    """``tests.train_script``'s final dumps are equal (weights, optimizer, streams)."""
    return (
        all(torch.equal(got["model"][k], v) for k, v in want["model"].items())
        and str(got["optimizer"]) == str(want["optimizer"])
        and (got["python"], got["numpy"], got["lr"]) == (want["python"], want["numpy"], want["lr"])
        and torch.equal(got["torch"], want["torch"])
    )


def elastic_restart(bench: Bench, row: Row, trials: int) -> None:
    """``torchrun --max-restarts=2`` of a 2-rank DDP job (``resume="auto"``, key
    ``TORCHELASTIC_RUN_ID``) whose seeded random rank is SIGKILLed at a random step of its
    first attempt. Survived: torchrun restarts the workers, they continue the same run from
    its newest commit and end bit for bit with an uninterrupted job, in one run."""
    from tests.distlib import reports, torchrun

    rng = random.Random(bench.seed + 19)
    common = ["--strategy", "ddp", "--steps", "10", "--save-every", "2", "--auto"]
    workdir = bench.workdir(f"{row.fault}-straight")
    bench.tracking(workdir)
    torchrun(2, workdir / "straight", *common)
    straight = {n: load_file(workdir / "straight" / n) for n in ("final.safetensors",)}

    def trial(i: int) -> None:
        trial_dir = bench.workdir(f"{row.fault}-{i}")
        bench.tracking(trial_dir)
        kill = f"{rng.randrange(2)}:{rng.randrange(1, 10)}"
        job = torchrun(
            2,
            trial_dir / "job",
            *common,
            "--first-attempt-kill",
            kill,
            check=False,
            torchrun_args=("--max-restarts=2",),
        )
        if job.returncode != 0:
            raise Failed(
                f"kill {kill}: torchrun exited {job.returncode}: {_job_failure(job.stderr)}"
            )
        done = reports(trial_dir / "job")
        killed_at = int(kill.split(":")[1])  # the kill comes before that step trains
        newest_before = killed_at - 1 - (killed_at % 2)  # every 2: steps 1, 3, 5...
        if {r["start_step"] for r in done} != {newest_before + 1}:
            raise Lost(f"kill {kill}: restarted at {[r['start_step'] for r in done]}")
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
        if len(runs) != 1:
            raise Failed(f"kill {kill}: {len(runs)} runs, not one")
        got = load_file(trial_dir / "job" / "final.safetensors")
        if not all(torch.equal(got[k], v) for k, v in straight["final.safetensors"].items()):
            raise Lost(f"kill {kill}: the restarted job did not end bit for bit")

    run_trials(row, trials, trial)


# ---------------------------------------------------------------- table


def kill9_fork(bench: Bench, row: Row, trials: int) -> None:
    """``mlflow-ckpt fork`` of a checkpoint of a run with 5,000 metric points, SIGKILLed at a
    seeded random moment (while it starts, copies or after it finished); then the same fork
    again (tests/forkcrash.py says what must hold)."""

    def trial(i: int) -> None:
        experiment = bench.tracking(bench.workdir(row.fault))
        mlflow.set_experiment(experiment_id=experiment)
        source = forkcrash.make_source(5_000)
        before = source.history(MlflowClient())
        delay = random.Random(f"{row.fault}-{bench.seed}-{i}").uniform(2.0, 9.0)
        forkcrash.kill_after(source, delay)
        lost, problems = forkcrash.check(source, before)
        if lost:
            raise Lost(f"killed after {delay:.2f} s: {'; '.join(lost)}")
        if problems:
            raise Failed(f"killed after {delay:.2f} s: {'; '.join(problems)}")

    run_trials(row, trials, trial)


def _three_checkpoints(seed: int) -> tuple[str, list[mlflow_ckpt.Checkpoint]]:
    """A run with three checkpoints of a 16 MB network, the weights moved between them."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(2048, 2048)
    with mlflow.start_run() as run:
        with mlflow_ckpt.CheckpointManager({"model": model}, async_save=False) as manager:
            for step in range(3):
                with torch.no_grad():
                    model.weight.add_(torch.randn_like(model.weight))
                manager.save(step)
    return run.info.run_id, mlflow_ckpt.list_checkpoints(run.info.run_id)


def _averages(experiment_id: str) -> list[Any]:
    return MlflowClient().search_logged_models(
        [experiment_id], filter_string="name LIKE 'average-step-%'"
    )


def _check_averages(experiment_id: str, want: dict[str, torch.Tensor], what: str) -> None:
    """Every committed average loads and is the mean; every other one is unresolvable."""
    for model in _averages(experiment_id):
        if model.tags.get("mlflow_ckpt.status") != "committed":
            try:
                resolve(model.model_id, MlflowClient())
            except mlflow_ckpt.CheckpointNotFoundError:
                continue
            raise Lost(f"{what}: a {model.tags.get('mlflow_ckpt.status')} average resolved")
        got = mlflow_ckpt.load_training_state(f"models:/{model.model_id}")["model"]
        if set(got) != set(want) or any(not torch.equal(got[k], want[k]) for k in want):
            raise Lost(f"{what}: committed average {model.model_id} is not the mean")


def kill9_average(bench: Bench, row: Row, trials: int) -> None:
    """``mlflow-ckpt average`` of three 16 MB checkpoints, SIGKILLed at a seeded random
    moment; then ``mlflow-ckpt gc`` of the run, as after any killed save."""

    def trial(i: int) -> None:
        experiment = bench.tracking(bench.workdir(row.fault))
        mlflow.set_experiment(experiment_id=experiment)
        run_id, ckpts = _three_checkpoints(bench.seed * 1000 + i)
        states = [mlflow_ckpt.load_training_state(c)["model"] for c in ckpts]
        want = {
            k: (sum(s[k].to(torch.float32) for s in states) / 3).to(states[0][k].dtype)
            for k in states[0]
        }
        delay = random.Random(f"{row.fault}-{bench.seed}-{i}").uniform(2.0, 8.0)
        env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow.get_tracking_uri())
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow_ckpt.cli", "average", *(c.uri for c in ckpts)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        what = f"killed after {delay:.2f} s"
        _check_averages(experiment, want, what)
        if mlflow_ckpt.list_checkpoints(run_id) != ckpts:
            raise Lost(f"{what}: the run's checkpoints changed")
        gc = subprocess.run(
            [sys.executable, "-m", "mlflow_ckpt.cli", "gc", run_id],
            env=env,
            capture_output=True,
            text=True,
        )
        if gc.returncode != 0:
            raise Failed(f"{what}: gc failed: {gc.stderr[-2000:]}")
        _check_averages(experiment, want, f"{what}, then gc")
        left = [
            m.model_id
            for m in _averages(experiment)
            if m.tags.get("mlflow_ckpt.status") != "committed"
        ]
        if left:
            raise Failed(f"{what}: gc left the half-made average(s) {left}")

    run_trials(row, trials, trial)


FAULTS: dict[str, tuple[str, Callable[[Bench, Row, int], None]]] = {
    "kill9-async": (
        "restart resumed from newest commit",
        lambda b, r, n: kill9(b, r, n, sync=False),
    ),
    "kill9-sync": (
        "restart resumed from newest commit",
        lambda b, r, n: kill9(b, r, n, sync=True),
    ),
    "kill9-auto": (
        "same command resumed newest commit",
        lambda b, r, n: kill9(b, r, n, sync=False, auto=True),
    ),
    **{
        name: ("detected, fallback to older", corruption)
        for name in (
            "corrupt-flip-byte",
            "corrupt-truncate",
            "corrupt-delete",
            "corrupt-manifest-edit",
            "corrupt-swap-files",
        )
    },
    "full-disk": ("clear error, nothing partial", full_disk),
    "dead-network": ("clear error, nothing partial", dead_network),
    "hostile-pickle": ("refused, payload never ran", hostile_pickle),
    "diverged-state": ("never committed, last finite kept", diverged_state),
    "kill9-distributed": ("restart resumed from newest commit", kill9_distributed),
    "kill9-compressed": (
        "restart resumed from newest commit",
        lambda b, r, n: kill9(b, r, n, sync=False, compression="zstd"),
    ),
    "corrupt-flip-byte-compressed": ("detected, fallback to older", corruption),
    "kill9-incremental": (
        "restart resumed from newest commit",
        lambda b, r, n: kill9(b, r, n, sync=False, frozen=True),
    ),
    "kill9-archive": (
        "restart resumed from newest commit",
        lambda b, r, n: kill9(b, r, n, sync=True, archive=True),
    ),
    "corrupt-distributed": ("detected, fallback to older", corrupt_distributed),
    "corrupt-shared-incremental": ("detected, fallback to milestone", corrupt_shared),
    "sigterm-preempt": ("signalled step saved, restart from it", sigterm_preempt),
    "elastic-restart": ("torchrun restart ends bit for bit", elastic_restart),
    "kill9-fork": ("source intact, half fork never resumed", kill9_fork),
    "kill9-average": ("nothing half-made visible, gc cleans", kill9_average),
}


def print_table(rows: list[Row]) -> None:
    header = f"{'fault':<28} {'trials':>6} {'survived':>8} {'lost':>5}  survived means"
    print(header)
    print("-" * len(header))
    for row in rows:
        if row.skipped:
            print(f"{row.fault:<28} {'-':>6} {'-':>8} {'-':>5}  {row.skipped}")
        else:
            print(f"{row.fault:<28} {row.trials:>6} {row.survived:>8} {row.lost:>5}  {row.meaning}")
    print(
        "\nlost = a committed checkpoint became unusable or disappeared, a partial or corrupt "
        "checkpoint was silently accepted, or a payload executed."
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--trials", type=int, default=None, help="per fault (default 5; 10 per kill -9 chain)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help=f"faults or prefixes of: {', '.join(FAULTS)}"
    )
    args = parser.parse_args(argv)
    names = list(FAULTS)
    if args.only:
        unknown = [o for o in args.only if not any(n.startswith(o) for n in FAULTS)]
        if unknown:
            parser.error(f"unknown fault {unknown}; choose from {', '.join(FAULTS)}")
        names = [n for n in FAULTS if any(n.startswith(o) for o in args.only)]

    logging.basicConfig(level=logging.WARNING)
    for name in ("mlflow", "mlflow_ckpt", "alembic", "botocore", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # The background worker logs each failed save at ERROR before re-raising it to the caller;
    # here the failures are injected on purpose, and the trials check what the caller sees.
    logging.getLogger("mlflow_ckpt.manager.worker").setLevel(logging.CRITICAL)
    warnings.simplefilter("ignore")

    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mlflow-ckpt-faults-") as scratch:
        bench = Bench(Path(scratch), args.seed)
        for name in names:
            meaning, run = FAULTS[name]
            trials = args.trials or (10 if name.startswith("kill9") else 5)
            row = Row(name, meaning)
            t0 = time.perf_counter()
            print(f"{name}: {trials} trials ...", end=" ", flush=True, file=sys.stderr)
            try:
                run(bench, row, trials)
            except Exception as exc:  # the harness itself broke: count the fault as failed
                row.problems.append(f"harness error {type(exc).__name__}: {exc}")
                row.problems.append(traceback.format_exc(limit=8))
            finally:
                _end_runs()
                mlflow.set_tracking_uri(None)
            print(f"{time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
            rows.append(row)
    print()
    print_table(rows)
    failed = [row for row in rows if not row.ok]
    for row in failed:
        print(f"\n{row.fault}: {row.trials - row.survived} of {row.trials} did not survive")
        for problem in row.problems:
            print("  " + problem.rstrip().replace("\n", "\n    "))
    print(f"\nwall time: {time.perf_counter() - started:.0f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Distributed checkpoints: real ``torchrun`` jobs (gloo, CPU) running ``tests/dist_job.py``.

Each job writes what every rank ends with (full model + optimizer state, start step, how
many MLflow clients it built...) under ``--out``; the tests compare those files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient
from safetensors.torch import load_file

import mlflow_ckpt
from mlflow_ckpt.catalog.shared import shared_area_uri
from mlflow_ckpt.cli import main as cli
from mlflow_ckpt.storage import local_path_of
from tests import servers
from tests.conftest import ROOT, StoreUnderTest
from tests.distlib import JOB, reports, torchrun

if TYPE_CHECKING:
    from conftest import SharedStore  # the root conftest's (module_store)

pytestmark = pytest.mark.slow


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different


def run_id_of(out: Path) -> str:
    return reports(out)[0]["run_id"]


# One 2-rank FSDP2 job of 4 steps saving steps 1 and 3, on the module's store, for the tests
# marked with this group: each ran the same job before. They only read it, resume it (which
# saves nothing: it ended at step 3) or, the one that damages a file, put the byte back.
# `make test` runs `--dist loadgroup`: the group stays on one worker, so the job runs once.
shares_fsdp2_job = pytest.mark.xdist_group("fsdp2-job")


@pytest.fixture(scope="module")
def fsdp2_job(module_store: SharedStore) -> Path:
    out = module_store.folder / "fsdp2-job"
    args = ("--strategy", "fsdp2", "--steps", "4", "--save-every", "2")
    torchrun(2, out, *args, env=module_store.env)
    return out


@shares_fsdp2_job
def test_fsdp2_saved_on_two_ranks_resumes_on_one_two_and_three(
    module_tracking: str, fsdp2_job: Path, tmp_path: Path
):
    saved = reports(fsdp2_job)
    assert [r["errors"] for r in saved] == [[], []]
    assert saved[0]["clients"] > 0 and saved[1]["clients"] == 0  # only rank 0 talks to MLflow
    assert [r["groups_left"] for r in saved] == [0, 0]  # close() destroyed the manager's groups
    run_id = run_id_of(fsdp2_job)
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run_id)] == [3, 1]
    expected = load_file(fsdp2_job / "saved-3.safetensors")
    assert any(k.endswith("/exp_avg_sq") for k in expected) and any(
        k.endswith("/step") for k in expected
    )
    for world in (1, 2, 3):
        out = tmp_path / f"resume-{world}"
        torchrun(world, out, "--strategy", "fsdp2", "--steps", "4", "--resume", run_id)
        assert_same(expected, load_file(out / "final.safetensors"))
        got = reports(out)
        assert [r["start_step"] for r in got] == [4] * world
        assert [r["errors"] for r in got] == [[]] * world
        assert [r["groups_left"] for r in got] == [0] * world
        # per-rank state: rank r takes saved rank r's; a new rank takes rank 0's
        assert [r["cursor_rank"] for r in got] == [min(r, 1) if r < 2 else 0 for r in range(world)]
        assert all(r["clients"] == 0 for r in got[1:])
        assert all(r["lr"] == saved[0]["lr"] and r["scheduler_epoch"] == 4 for r in got)


@shares_fsdp2_job
def test_compressed_fsdp2_checkpoint_resumes_on_three_ranks_and_in_a_plain_process(
    module_tracking: str, fsdp2_job: Path, tmp_path: Path
):
    args = ("--strategy", "fsdp2", "--steps", "4", "--save-every", "2")
    torchrun(2, tmp_path / "save", *args, "--compression", "zstd")  # as fsdp2_job, compressed
    run_id = run_id_of(tmp_path / "save")
    ckpt = mlflow_ckpt.latest_checkpoint(run_id)
    plain = mlflow_ckpt.latest_checkpoint(run_id_of(fsdp2_job))
    assert ckpt is not None and plain is not None and ckpt.step == plain.step == 3
    # the logical size, whatever the encoding (metadata.json names each chunk's codec too)
    assert abs(ckpt.size_bytes - plain.size_bytes) < 512 and ckpt.stored_bytes != plain.stored_bytes
    folder = Path(ckpt.artifact_location)
    meta = json.loads((folder / "shards" / "metadata.json").read_text())
    chunks = [c for t in meta["tensors"].values() for c in t["chunks"]]
    assert chunks and all(c["codec"] == "zstd" for c in chunks)
    assert json.loads((folder / "manifest.json").read_text())["compression"] == "zstd"
    assert list(folder.glob("ranks/*/*.ztensors"))  # each rank's own tensors too
    expected = load_file(tmp_path / "save" / "saved-3.safetensors")
    out = tmp_path / "resume-3"
    torchrun(3, out, "--strategy", "fsdp2", "--steps", "4", "--resume", run_id)
    assert_same(expected, load_file(out / "final.safetensors"))
    state = mlflow_ckpt.load_training_state(ckpt.uri)
    for key, value in expected.items():
        parts = key.split("/")
        if parts[0] == "model":
            assert torch.equal(state["model"][parts[1]], value), key
    assert CliRunner().invoke(cli, ["verify", run_id]).exit_code == 0
    shard = next(folder.glob("shards/rank-00001-*.bin"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = CliRunner().invoke(cli, ["verify", ckpt.uri])
    assert result.exit_code == 1 and shard.name in result.output


# torch < 2.10's FSDP2 re-pads an unevenly sharded parameter into new memory at the first
# forward (`FSDPParam.reset_sharded_param`; 2.10 keeps the memory it padded at `fully_shard`),
# so after a resume a rank whose frozen shard is padded no longer finds it where the resume
# recorded it and its first save hashes that shard once more (measured on 2.7.0: rank 1
# hashed 114 elements where 74 were expected). The bytes saved are the same either way.
REPADS_ON_FIRST_FORWARD = tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 10)


def test_incremental_fsdp2_saves_reference_unchanged_chunks_and_resume_on_three(
    tracking: str, tmp_path: Path, run_child
):
    args = ("--strategy", "fsdp2", "--steps", "8", "--save-every", "2", "--freeze-first")
    torchrun(2, tmp_path / "save", *args, "--keep-last", "2", "--async-save")
    run_id = run_id_of(tmp_path / "save")
    kept = mlflow_ckpt.list_checkpoints(run_id)
    assert [c.step for c in kept] == [7, 5]
    # the first save (step 1) wrote the frozen layer's chunks straight to the shared area;
    # steps 3, 5 and 7 reference them there, neither copied at snapshot time nor hashed
    # (step 1 itself was deleted by retention)
    saved = reports(tmp_path / "save")
    assert kept[0].shared == kept[1].shared == (saved[0]["saved_models"][0],)
    assert [r["last_shared"] for r in saved] == [list(kept[0].shared)] * 2  # tuples, too
    for rank in saved:
        first, *later = rank["hashed_per_save"]
        assert rank["frozen_local_numel"] > 0 and len(later) == 3
        assert later == [first - rank["frozen_local_numel"]] * 3, rank
    area = local_path_of(shared_area_uri(MlflowClient().get_run(run_id).info.artifact_uri))
    assert area is not None and {p.name for p in area.iterdir()} == set(kept[0].shared)
    folder = Path(kept[0].artifact_location)
    own = [p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json"]
    assert kept[0].stored_bytes == sum(p.stat().st_size for p in own)  # referenced: not added
    meta = json.loads((folder / "shards" / "metadata.json").read_text())
    frozen = next(t for name, t in meta["tensors"].items() if name.endswith("0.weight"))["chunks"]
    assert frozen and all(c["file"].startswith("@shared/") for c in frozen)
    expected = load_file(tmp_path / "save" / "saved-7.safetensors")
    out = tmp_path / "resume-3"
    torchrun(3, out, *args, "--resume", run_id)
    assert_same(expected, load_file(out / "final.safetensors"))
    assert CliRunner().invoke(cli, ["verify", run_id]).exit_code == 0
    # resumed on the same two ranks, the first save after the resume references the frozen
    # chunks unread too (the resume recorded where they lie and that the load wrote them)
    out = tmp_path / "resume-2"
    more = ("--strategy", "fsdp2", "--steps", "12", "--save-every", "2", "--freeze-first")
    torchrun(2, out, *more, "--keep-last", "2", "--resume", run_id)
    for before, after in zip(saved, reports(out), strict=True):
        expected = before["hashed_per_save"][1:3]  # 9, 11
        if REPADS_ON_FIRST_FORWARD and after["hashed_per_save"] != expected:
            # this rank's frozen shard is padded: torch moved it, the save hashed it once more
            expected[0] += before["frozen_local_numel"]
        assert after["hashed_per_save"] == expected, after
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run_id)] == [11, 9]
    assert mlflow_ckpt.list_checkpoints(run_id)[0].shared == kept[0].shared
    assert CliRunner().invoke(cli, ["verify", run_id]).exit_code == 0
    # promoted: the shard files it referenced are copied in; it outlives its collected run
    latest = mlflow_ckpt.list_checkpoints(run_id)[0]
    mlflow_ckpt.promote(latest, "dist-incremental", alias="champion")
    assert not mlflow_ckpt.list_checkpoints(run_id)[0].shared
    client = MlflowClient()
    for other in mlflow_ckpt.list_checkpoints(run_id)[1:]:
        client.delete_logged_model(other.model_id)
    client.delete_run(run_id)
    run_child("mlflow", "gc", "--backend-store-uri", tracking)
    assert not area.exists()
    state = mlflow_ckpt.load_training_state("models:/dist-incremental@champion")
    model_keys = {
        k.split("/")[1]: v
        for k, v in load_file(out / "final.safetensors").items()
        if k.startswith("model/")
    }
    assert all(torch.equal(state["model"][k], v) for k, v in model_keys.items())


def test_resume_skips_only_a_damaged_checkpoint_and_the_same_way_on_every_rank(
    tracking: str, tmp_path: Path
):
    args = ("--strategy", "fsdp2", "--steps", "6", "--save-every", "2", "--freeze-first")
    torchrun(2, tmp_path / "save", *args, "--keep-every", "4")  # a milestone at step 3
    run_id = run_id_of(tmp_path / "save")
    newest, older = mlflow_ckpt.list_checkpoints(run_id)  # (retention deleted step 1)
    # the milestone is self-contained; the save after it keeps the frozen layer's chunks in
    # a new group of its own
    assert older.step == 3 and older.shared == () and newest.shared == (newest.model_id,)
    # a bug while reading on rank 1 is raised on both ranks, never hidden by resuming older
    broken = torchrun(
        2, tmp_path / "bug", *args, "--resume", run_id, "--break-resume-rank", "1", check=False
    )
    assert broken.returncode != 0
    assert "injected bug in read_rank" in broken.stderr and "Skipping" not in broken.stderr
    assert reports(tmp_path / "bug") == []  # no rank went on to train
    status = MlflowClient().get_logged_model(newest.model_id).tags["mlflow_ckpt.status"]
    assert status == "committed"
    # a flipped byte in rank 1's shared chunks of the newest: both ranks skip it and resume
    # the milestone, which does not reference them
    area = local_path_of(shared_area_uri(MlflowClient().get_run(run_id).info.artifact_uri))
    assert area is not None
    shard = next((area / newest.model_id).glob("rank-00001-*.bin"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    resumed = torchrun(2, tmp_path / "resume", *args, "--resume", run_id)
    assert f"Skipping checkpoint {newest.uri} (step {newest.step})" in resumed.stderr
    assert [r["start_step"] for r in reports(tmp_path / "resume")] == [older.step + 1] * 2
    tags = MlflowClient().get_logged_model(newest.model_id).tags
    assert tags["mlflow_ckpt.status"] == "corrupt"


@shares_fsdp2_job
def test_two_rank_checkpoint_in_one_plain_process(
    module_tracking: str, fsdp2_job: Path, tmp_path: Path
):
    run_id = run_id_of(fsdp2_job)
    ckpt = mlflow_ckpt.latest_checkpoint(run_id)
    assert ckpt is not None and ckpt.step == 3
    expected = load_file(fsdp2_job / "saved-3.safetensors")
    state = mlflow_ckpt.load_training_state(ckpt.uri)
    # the FULL state dict, keyed like the unwrapped module
    assert list(state["model"]) == ["0.weight", "0.bias", "3.weight", "3.bias"]
    for key, value in expected.items():
        parts = key.split("/")
        if parts[0] == "model":
            assert torch.equal(state["model"][parts[1]], value), key
        else:
            assert torch.equal(state["optimizer"]["state"][parts[1]][parts[2]].reshape(-1), value)
    assert state["data"]["rank"] == 0 and state["_progress"]["step"] == 3

    from tests.dist_job import build_model

    model = build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    loaded = mlflow_ckpt.load(ckpt.uri, {"model": model, "optimizer": opt})
    assert loaded.step == 3
    assert torch.equal(model.state_dict()["3.weight"], expected["model/3.weight"])
    assert torch.equal(
        opt.state_dict()["state"][0]["exp_avg"], state["optimizer"]["state"]["0.weight"]["exp_avg"]
    )

    batch = torch.randn(3, 7)
    served = mlflow.pyfunc.load_model(ckpt.uri).predict(batch.numpy())
    with torch.no_grad():
        assert torch.allclose(torch.as_tensor(served), model.eval()(batch))

    result = CliRunner().invoke(cli, ["verify", run_id])
    assert result.exit_code == 0, result.output
    out = tmp_path / "model.safetensors"
    result = CliRunner().invoke(cli, ["export", ckpt.uri, "--format", "safetensors", "-o", out])
    assert result.exit_code == 0, result.output
    exported = load_file(out)
    assert set(exported) == set(state["model"])
    assert all(torch.equal(exported[k], v) for k, v in state["model"].items())
    older = mlflow_ckpt.list_checkpoints(run_id)[1]
    result = CliRunner().invoke(cli, ["diff", older.uri, ckpt.uri])
    assert result.exit_code == 0 and "3.weight" in result.output, result.output
    version = mlflow_ckpt.promote(ckpt, "dist-model", alias="champion")
    assert int(version.version) == 1
    served = mlflow.pyfunc.load_model("models:/dist-model@champion").predict(batch.numpy())
    with torch.no_grad():
        assert torch.allclose(torch.as_tensor(served), model.eval()(batch))
    shard = next(Path(ckpt.artifact_location).glob("shards/rank-00001-*.bin"))
    original = shard.read_bytes()
    data = bytearray(original)
    data[0] ^= 0xFF
    shard.write_bytes(bytes(data))
    try:
        result = CliRunner().invoke(cli, ["verify", ckpt.uri])
        assert result.exit_code == 1 and shard.name in result.output
    finally:
        shard.write_bytes(original)  # the job is shared: other tests resume from it
    assert CliRunner().invoke(cli, ["verify", ckpt.uri]).exit_code == 0


def test_ddp_kill9_after_commit_resumes_bit_for_bit(tracking: str, tmp_path: Path):
    common = ["--strategy", "ddp", "--steps", "6", "--save-every", "3"]
    torchrun(2, tmp_path / "straight", *common)
    killed = torchrun(2, tmp_path / "first", *common, "--die-after", "2", check=False)
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr
    run_id = mlflow.search_runs(search_all_experiments=True, order_by=["start_time DESC"]).run_id[0]
    torchrun(2, tmp_path / "resumed", *common, "--resume", run_id)
    assert [r["start_step"] for r in reports(tmp_path / "resumed")] == [3, 3]
    for name in ("final.safetensors", "local-0.safetensors", "local-1.safetensors"):
        assert_same(load_file(tmp_path / "straight" / name), load_file(tmp_path / "resumed" / name))
    # each rank's own random stream (dropout) continued where it was
    straight, resumed = reports(tmp_path / "straight"), reports(tmp_path / "resumed")
    assert [r["rng"] for r in straight] == [r["rng"] for r in resumed]
    assert straight[0]["rng"] != straight[1]["rng"]


def test_async_saves_across_ranks_of_a_compiled_ddp_model(tracking: str, tmp_path: Path):
    model = ["--strategy", "ddp", "--compile"]  # torch.compile(DDP(model))
    torchrun(2, tmp_path / "save", *model, "--steps", "4", "--save-every", "2", "--async-save")
    run_id = run_id_of(tmp_path / "save")
    ckpts = mlflow_ckpt.list_checkpoints(run_id)
    assert [c.step for c in ckpts] == [3, 1]
    state = mlflow_ckpt.load_training_state(ckpts[0].uri)  # keyed like the plain module
    assert list(state["model"]) == ["0.weight", "0.bias", "3.weight", "3.bias"]
    assert list(state["optimizer"]["state"]) == list(state["model"])
    torchrun(2, tmp_path / "resume", *model, "--steps", "4", "--resume", run_id)
    assert_same(
        load_file(tmp_path / "save" / "saved-3.safetensors"),
        load_file(tmp_path / "resume" / "final.safetensors"),
    )


def test_a_rank_failing_mid_save_commits_nothing(tracking: str, tmp_path: Path):
    out = tmp_path / "fail"
    torchrun(2, out, "--steps", "4", "--save-every", "2", "--fail-rank", "1", "--fail-step", "3")
    for report in reports(out):  # every rank raised, naming rank 1 and its cause
        assert report["errors"], report
        assert "failed on rank 1" in report["errors"][0]
        assert "complex128" in report["errors"][0]
        assert "step 1 is still intact" in report["errors"][0]
    run_id = run_id_of(out)
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run_id)] == [1]
    client = mlflow.MlflowClient()
    experiment = mlflow.get_run(run_id).info.experiment_id
    assert len(client.search_logged_models(experiment_ids=[experiment])) == 1  # failed: removed
    torchrun(2, tmp_path / "resume", "--steps", "2", "--resume", run_id)
    assert [r["start_step"] for r in reports(tmp_path / "resume")] == [2, 2]


def test_a_rank_killed_mid_save_leaves_the_previous_checkpoint(tracking: str, tmp_path: Path):
    out = tmp_path / "killed"
    proc = torchrun(
        2,
        out,
        "--steps",
        "4",
        "--save-every",
        "2",
        "--kill-rank",
        "1",
        "--kill-step",
        "3",
        check=False,
    )
    assert proc.returncode != 0 and "SIGKILL" in proc.stderr
    run_id = mlflow.search_runs(search_all_experiments=True).run_id[0]
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run_id)] == [1]
    artifacts = Path(
        mlflow.get_experiment(
            mlflow.get_run(run_id).info.experiment_id
        ).artifact_location.removeprefix("file://")
    )
    partial = {p.parent.parent.parent.name for p in artifacts.glob("models/*/artifacts/shards/*")}
    assert len(partial) == 2  # step 1's, and the half-written one
    torchrun(2, tmp_path / "resume", "--steps", "4", "--resume", run_id)
    got = reports(tmp_path / "resume")
    assert [r["start_step"] for r in got] == [2, 2] and [r["errors"] for r in got] == [[], []]
    kept = {c.model_id for c in mlflow_ckpt.list_checkpoints(run_id)}
    left = {p.parent.parent.parent.name for p in artifacts.glob("models/*/artifacts/shards/*")}
    assert left == kept  # recovery removed the partial files


@pytest.mark.parametrize("store", ["s3", "azure", "gcs", "proxy"], indirect=True)
def test_fsdp2_on_every_remote_store_with_retention(store: StoreUnderTest, tmp_path: Path):
    """Every rank writes its shards straight into the store (the proxy: over HTTP); with
    keep_last_n=1 the older checkpoints' files of every rank are deleted."""
    common = ["--steps", "6", "--save-every", "2", "--keep-last", "1"]
    torchrun(2, tmp_path / "save", *common)
    saved = reports(tmp_path / "save")
    assert [r["errors"] for r in saved] == [[], []] and saved[1]["clients"] == 0
    run_id = saved[0]["run_id"]
    ckpts = mlflow_ckpt.list_checkpoints(run_id)
    assert [c.step for c in ckpts] == [5]
    assert store.model_ids_with_files() == {ckpts[0].model_id}
    names = {key.rsplit("/", 1)[1] for key in store.list_keys() if "/shards/" in key}
    assert {"rank-00000-00.bin", "rank-00001-00.bin", "metadata.json"} <= names
    torchrun(2, tmp_path / "resume", "--steps", "6", "--resume", run_id)
    assert_same(
        load_file(tmp_path / "save" / "saved-5.safetensors"),
        load_file(tmp_path / "resume" / "final.safetensors"),
    )
    assert mlflow_ckpt.load_training_state(ckpts[0].uri)["_progress"]["step"] == 5


# ------------------------------------------------- ranks that see different file systems


def launch_ranks(
    world: int, out: Path, args: list[str], namespace: dict[int, str]
) -> list[subprocess.CompletedProcess[str]]:
    """Start the ranks by hand (no torchrun); rank ``r`` in ``namespace`` runs in a mount
    namespace of its own after the shell command given (a tmpfs over a folder, say): what a
    node without the shared file system, or with a full disk, sees."""
    port = servers.free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow.get_tracking_uri(), OMP_NUM_THREADS="1")
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank))
        env.update(WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        cmd = [sys.executable, str(JOB), "--out", str(out), *args]
        if rank in namespace:
            script = f'{namespace[rank]} && exec "$@"'
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *cmd]
        procs.append(
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    done = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return done


needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="mounting a tmpfs in a mount namespace needs root (CI has it)"
)


@needs_root
def test_an_artifact_root_a_rank_cannot_see_is_refused(tracking: str, tmp_path: Path):
    root = tmp_path / "artifacts"
    root.mkdir()
    hide = {1: f"mount -t tmpfs -o size=1m tmpfs {root}"}  # rank 1 sees an empty folder there
    args = ["--steps", "2", "--save-every", "1", "--artifact-root", str(root)]
    done = launch_ranks(2, tmp_path / "out", args, hide)
    for proc in done:
        assert proc.returncode != 0
        assert "rank(s) 1 cannot see" in proc.stderr, proc.stderr[-3000:]
        assert str(root) in proc.stderr and "S3, GCS, Azure" in proc.stderr
    assert not list(root.glob("models/*"))  # nothing written, no probe left behind
    assert not list(root.glob(".mlflow-ckpt-rank-probe-*"))


@needs_root
def test_a_rank_with_a_full_disk_fails_the_save_and_the_previous_one_resumes(
    tracking: str, tmp_path: Path
):
    root = tmp_path / "artifacts"
    args = ["--steps", "2", "--save-every", "2", "--artifact-root", str(root)]
    torchrun(2, tmp_path / "first", *args)
    run_id = run_id_of(tmp_path / "first")
    models, upper = root / "models", tmp_path / "rank1-disk"
    upper.mkdir()
    # rank 1 sees the saved checkpoints, but what it writes lands on a full 64 KiB tmpfs
    full = {
        1: f"mount -t tmpfs -o size=64k tmpfs {upper} && mkdir {upper}/u {upper}/w && "
        f"mount -t overlay overlay -o lowerdir={models},upperdir={upper}/u,workdir={upper}/w "
        f"{models} && (dd if=/dev/zero of={models}/filler bs=4k count=64 2>/dev/null || true)"
    }
    resume = ["--steps", "4", "--save-every", "2", "--resume", run_id]
    done = launch_ranks(2, tmp_path / "full", resume, full)
    assert [p.returncode for p in done] == [0, 0], done[0].stderr[-3000:]
    for report in reports(tmp_path / "full"):
        assert report["errors"], report
        assert "failed on rank 1" in report["errors"][0]
        assert "no space left on device" in report["errors"][0]
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run_id)] == [1]
    torchrun(2, tmp_path / "again", *resume)
    got = reports(tmp_path / "again")
    assert [r["start_step"] for r in got] == [2, 2] and [r["errors"] for r in got] == [[], []]
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run_id)] == [3, 1]


# ------------------------------------------------------------------ framework integrations


def _lightning_ddp(epochs: int, out: Path, *resume: str) -> None:
    pytest.importorskip("lightning.pytorch")
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow.get_tracking_uri(), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    script = ROOT / "tests" / "lightning_ddp_job.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(epochs), str(out), *resume],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]


def test_lightning_ddp_saves_from_every_rank_and_resumes_bit_for_bit(tracking: str, tmp_path: Path):
    _lightning_ddp(4, tmp_path / "straight")
    _lightning_ddp(2, tmp_path / "first")
    run_id = (tmp_path / "first" / "run_id").read_text()
    ckpt = mlflow_ckpt.latest_checkpoint(run_id)
    assert ckpt is not None
    folder = Path(ckpt.artifact_location)
    assert sorted(p.name for p in folder.glob("ranks/*")) == ["00000", "00001"]
    _lightning_ddp(4, tmp_path / "resumed", run_id)
    straight = torch.load(tmp_path / "straight" / "weights.pt")
    resumed = torch.load(tmp_path / "resumed" / "weights.pt")
    assert_same(straight, resumed)  # dropout on both ranks: each rank's stream was restored


def _hf_torchrun(out: Path, epochs: int, stop_after: int, *resume: str) -> None:
    pytest.importorskip("transformers")
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow.get_tracking_uri(), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(ROOT / "tests" / "hf_ddp_job.py"), str(epochs), str(stop_after), str(out)]
    proc = subprocess.run([*cmd, *resume], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]


def test_hf_trainer_under_torchrun_saves_from_every_rank_and_resumes_bit_for_bit(
    tracking: str, tmp_path: Path
):
    _hf_torchrun(tmp_path / "straight", 4, 4)
    _hf_torchrun(tmp_path / "first", 4, 2)  # the schedule is for 4 epochs, stopped after 2
    run_id = (tmp_path / "first" / "run_id").read_text()
    ckpt = mlflow_ckpt.latest_checkpoint(run_id)
    assert ckpt is not None and ckpt.step == 3
    assert sorted(p.name for p in Path(ckpt.artifact_location).glob("ranks/*")) == [
        "00000",
        "00001",
    ]
    _hf_torchrun(tmp_path / "resumed", 4, 4, run_id)
    for rank in (0, 1):  # dropout in the model: each rank's random stream was restored
        assert_same(
            torch.load(tmp_path / "straight" / f"weights-{rank}.pt"),
            torch.load(tmp_path / "resumed" / f"weights-{rank}.pt"),
        )
    assert [c.step for c in mlflow_ckpt.list_checkpoints(run_id)] == [7, 5, 3, 1]

"""A training process that saves every step, to be killed at random moments by the harness.

    python -m tests.crash_child --run-file F --log F [--sync] [--steps N]
    python -m tests.crash_child --zygote

A zygote has imported torch and MLflow once and forks one real process per line read from
stdin (its stderr file, then its arguments), answering ``pid N`` and, once that process is
gone, ``exit N CODE`` (CODE is
negative for a signal). Forking saves the seconds of imports per trial, so a CI run affords
many kills; what is killed is still a separate process with its own file descriptors,
threads and SQLite connections.

Without a run file it starts a run; with one it resumes it and first checks that the resume
picked the newest committed checkpoint. With ``MLFLOW_CKPT_CRASH_AUTO`` set it is the same
command every time (``resume="auto"``, key ``crash-harness``); the run file only tells the
harness the run. It appends one line per event to ``--log`` (with
O_APPEND, so a kill never leaves half a line that matters):

* ``started`` once the tracking store is open (a resume or a first save comes next);
* ``resumed S`` (S = -1 without a checkpoint) or ``resume-mismatch S NEWEST``;
* ``committed S`` whenever the newest committed checkpoint advanced;
* ``writer ID`` (the writer lease ID tagged on its checkpoints);
* ``done`` after ``close()``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import mlflow
import torch

import mlflow_ckpt


def _log(fd: int, line: str) -> None:
    os.write(fd, f"{line}\n".encode())


FROZEN = bool(os.environ.get("MLFLOW_CKPT_CRASH_FROZEN"))  # the incremental rows
# resume="auto": no run ID passed, the run found by its key (kills land in its lookup too)
AUTO = bool(os.environ.get("MLFLOW_CKPT_CRASH_AUTO"))
FROZEN_EVERY = 5  # steps between in-place edits of the frozen layer (a new shared group)


def build() -> dict[str, object]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.Tanh(), torch.nn.Linear(256, 4))
    if FROZEN:  # a frozen first layer: later saves reference its bytes in the shared area
        model[0].requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return {"model": model, "optimizer": opt, "data": torch.Generator().manual_seed(5)}


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run-file", type=Path, required=True)
    p.add_argument("--log", type=Path, required=True)
    p.add_argument("--sync", action="store_true")
    p.add_argument("--steps", type=int, default=1_000_000)
    p.add_argument("--force", action="store_true")
    p.add_argument("--extra-steps", type=int, help="stop this many steps after the start")
    args = p.parse_args(argv)
    fd = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    state = build()
    mlflow.MlflowClient().get_experiment_by_name("crash")  # the tracking store is open
    _log(fd, "started")
    opts: dict[str, object] = dict(save_every_n_steps=1, keep_last_n=3, async_save=not args.sync)
    if os.environ.get("MLFLOW_CKPT_CRASH_ARCHIVE"):  # milestones recompressed in place
        opts.update(keep_every_n_steps=4, archive_after_n=1)
    if FROZEN:  # self-contained milestones, archived by a background job of their own:
        # kills land while groups start and are released, and while milestones are archived
        opts.update(keep_every_n_steps=6, archive_after_n=2)
    if os.environ.get("MLFLOW_CKPT_CRASH_COMPRESSION"):  # the compressed rows of the harness
        opts["compression"] = os.environ["MLFLOW_CKPT_CRASH_COMPRESSION"]
    manager = _open(args, state, opts, fd)
    _log(fd, f"writer {manager.writer_id}")
    model, opt, data = state["model"], state["optimizer"], state["data"]
    reported = manager.start_step - 1
    stop = args.steps if args.extra_steps is None else manager.start_step + args.extra_steps
    for step in range(manager.start_step, stop):
        x = torch.randn(32, 128, generator=data)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if FROZEN and step % FROZEN_EVERY == 0:
            with torch.no_grad():  # a deterministic edit: resumed runs redo it identically
                model[0].bias.mul_(0.5)
        manager.step(step, {"loss": loss.item()})
        last = manager.last_checkpoint
        if last is not None and last.step > reported:
            reported = last.step
            _log(fd, f"committed {reported}")
        time.sleep(0.005)
    manager.close()
    mlflow.end_run()
    _log(fd, "done")


def _open(
    args: argparse.Namespace, state: dict[str, object], opts: dict[str, object], fd: int
) -> mlflow_ckpt.CheckpointManager:
    """Start or resume the run; log which checkpoint a resume picked."""
    if AUTO:  # the identical command every time: the run is found by its key
        manager = mlflow_ckpt.CheckpointManager(
            state, resume="auto", run_name="crash-harness", force=args.force, **opts
        )
    elif args.run_file.exists():
        run_id = args.run_file.read_text().strip()
        manager = mlflow_ckpt.CheckpointManager.resume(run_id, state, force=args.force, **opts)
    else:
        mlflow.start_run(run_name="crash-harness")
        _record_run(args.run_file, mlflow.active_run().info.run_id)
        return mlflow_ckpt.CheckpointManager(state, **opts)
    _record_run(args.run_file, manager.run_id)
    newest = mlflow_ckpt.latest_checkpoint(manager.run_id)
    got = manager.resumed_from.step if manager.resumed_from else -1
    want = newest.step if newest else -1
    _log(fd, f"resumed {got}" if got == want else f"resume-mismatch {got} {want}")
    return manager


def _record_run(run_file: Path, run_id: str) -> None:
    """Tell the harness the run (written whole: a kill never leaves half an ID)."""
    if not run_file.exists():
        tmp = run_file.with_suffix(".tmp")
        tmp.write_text(run_id)
        os.replace(tmp, run_file)


def zygote() -> None:
    for line in sys.stdin:
        err_file, *argv = line.split()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                err = os.open(err_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(err, 2)
                sys.stderr = os.fdopen(2, "w", buffering=1)
                main(argv)
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                sys.stderr.flush()
                os._exit(code)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {pid} {os.waitstatus_to_exitcode(status)}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--zygote"]:
        zygote()
    else:
        main(sys.argv[1:])

"""Loading a compressed checkpoint against an uncompressed one, as a resume does it.

Saves the same model + AdamW state (``--params`` million parameters, ~12 bytes each) once
plain and once with ``compression="zstd"``, then loads each ``--rounds`` times, the two
alternating, each load into a newly built model and optimizer (no moments yet), as a
resume does. Three settings:

* ``in-process``: every load in this process. Memory freed by one load is handed to the
  next, so the decoder writes into pages already mapped: the best case for decoding.
* ``new process``: every load in a process of its own (what a resume is). Its MLflow client
  has queried the tracking store before the clock starts (a training script has started its
  run by then), so MLflow's import and connection are not counted. The checkpoint's files
  are in the page cache.
* ``new process, cold``: the same with the page cache dropped before each load (the files
  come from the local disk). It needs root (``/proc/sys/vm/drop_caches``); skipped
  otherwise.

For each: the median load time, and load + first training step (a forward, backward and
AdamW step on the loaded objects), plain and compressed, and their ratios.

``--direct``: instead, the compressed checkpoint only, in-process, loaded with and without
decoding straight into the module's parameters (``mlflow_ckpt.snapshot.direct``; without
it, every tensor is decoded into new memory and ``load_state_dict`` copies it), in pairs
whose order alternates, with the median of the per-pair ratios: this machine's speed
swings too much for a ratio of two medians.

    python benchmarks/compressed_load.py [--params 50] [--rounds 7] [--skip-cold] [--direct]

Run it from another checkout (``git worktree``) to compare with an older version: it only
uses the public API.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path.cwd()))  # the checkout under test (its mlflow_ckpt)
sys.path.append(str(Path(__file__).resolve().parent))

import mlflow
import torch
from stall import build

import mlflow_ckpt

WIDTH = 2048  # stall.build's layer width
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def new_objects(layers: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model and optimizer a resuming script builds before it loads."""
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers)])
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def timed_load(uri: str, layers: int) -> dict[str, float]:
    """Load ``uri`` into new objects, then run one training step: both timed."""
    model, opt = new_objects(layers)
    x = torch.randn(2, WIDTH)
    started = time.perf_counter()
    mlflow_ckpt.load(uri, {"model": model, "optimizer": opt})
    load = time.perf_counter() - started
    model(x).sum().backward()
    started = time.perf_counter()
    opt.step()
    return {"load": load, "both": load + time.perf_counter() - started}


def child(uri: str, layers: int) -> None:
    """One load in a process of its own; prints its times as JSON."""
    mlflow.MlflowClient().search_experiments(max_results=1)  # the run is started by now
    print(json.dumps(timed_load(uri, layers)))


def in_child(uri: str, layers: int, cold: bool) -> dict[str, float]:
    """One load in a new process; ``cold``: with the page cache dropped first."""
    if cold:
        os.sync()
        DROP_CACHES.write_text("3\n")
    done = subprocess.run(
        [sys.executable, __file__, "--child", uri, str(layers)],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ.copy(),
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(
    label: str, rounds: int, load: Callable[[str], dict[str, float]], uris: dict[str, str]
) -> None:
    """Alternate plain and compressed loads ``rounds`` times; print medians and ratios."""
    times: dict[str, list[dict[str, float]]] = {"plain": [], "zstd": []}
    for _ in range(rounds):
        for name in times:
            times[name].append(load(uris[name]))

    def median(name: str, key: str) -> float:
        return statistics.median(t[key] for t in times[name])

    print(
        f"{label:<20} load: plain {median('plain', 'load'):.3f} s, zstd "
        f"{median('zstd', 'load'):.3f} s, {median('zstd', 'load') / median('plain', 'load'):.2f}x"
        f" | load + first step: plain {median('plain', 'both'):.3f} s, zstd "
        f"{median('zstd', 'both'):.3f} s, {median('zstd', 'both') / median('plain', 'both'):.2f}x"
    )


def compare_direct(rounds: int, layers: int, uri: str) -> None:
    """Compressed loads with and without decoding into parameters, in alternating pairs."""
    from mlflow_ckpt.snapshot import direct

    def load(into_parameters: bool) -> float:
        direct.DIRECT = into_parameters
        try:
            return timed_load(uri, layers)["load"]
        finally:
            direct.DIRECT = True

    load(True), load(False)  # (warm-up)
    pairs = []
    for i in range(rounds):
        order = (True, False) if i % 2 == 0 else (False, True)
        times = {mode: load(mode) for mode in order}
        pairs.append((times[True], times[False]))
        print(f"  pair {i}: into parameters {times[True]:.3f} s, plain {times[False]:.3f} s")
    ratio = statistics.median(plain / into for into, plain in pairs)
    print(
        f"in-process, zstd: into parameters {statistics.median(p[0] for p in pairs):.3f} s, "
        f"plain {statistics.median(p[1] for p in pairs):.3f} s (medians of {rounds}); "
        f"median per-pair ratio plain / into parameters {ratio:.3f}"
    )


def main(argv: list[str]) -> None:
    if argv[:1] == ["--child"]:
        child(argv[1], int(argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=50, help="million parameters")
    parser.add_argument("--rounds", type=int, default=7, help="loads of each, alternating")
    parser.add_argument("--skip-cold", action="store_true", help="no page-cache-dropped run")
    parser.add_argument("--direct", action="store_true", help="into parameters vs plain")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mlflow-ckpt-zload-"))
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = tracking  # (the children's too)
    try:
        mlflow.set_tracking_uri(tracking)
        mlflow.create_experiment("compressed-load", artifact_location=(work / "art").as_uri())
        mlflow.set_experiment("compressed-load")
        torch.manual_seed(0)
        model, opt = build(args.params)
        layers = len(model)  # type: ignore[arg-type]
        uris = {}
        for name, options in (("plain", {}), ("zstd", {"compression": "zstd"})):
            with mlflow.start_run(run_name=name) as run:
                with mlflow_ckpt.CheckpointManager(
                    {"model": model, "optimizer": opt},
                    async_save=False,
                    timeline=False,
                    **options,
                ) as mgr:
                    mgr.save(1)
            newest = mlflow_ckpt.latest_checkpoint(run.info.run_id)
            assert newest is not None
            uris[name] = newest.uri
            stored = newest.stored_bytes / 1e6
            print(f"{name}: {newest.size_bytes / 1e6:.0f} MB of state, {stored:.0f} MB stored")
        del model, opt
        if args.direct:
            compare_direct(args.rounds, layers, uris["zstd"])
            return
        compare("in-process", args.rounds, lambda uri: timed_load(uri, layers), uris)
        compare("new process", args.rounds, lambda uri: in_child(uri, layers, False), uris)
        if args.skip_cold:
            return
        if not os.access(DROP_CACHES, os.W_OK):
            print(f"new process, cold: skipped ({DROP_CACHES} is not writable: run as root)")
            return
        compare("new process, cold", args.rounds, lambda uri: in_child(uri, layers, True), uris)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])

"""Take the docs' screenshots of the MLflow UI with a real browser: a maintainer tool.

Makes ``models-tab.png`` (the experiment's Models tab in "Model training" mode: one row per
checkpoint, its metrics and parameters as columns) and ``timeline.png`` (the run's
``mlflow_ckpt/timeline.png`` opened in the run page's Artifacts view), next to this file; and,
from ``examples/fork_after_spike.py``, ``fork-runs.png`` (the experiment's runs table with the
source run unfolded: the fork nested under it, with its ``restart_lr``, ``loss`` and the step
it was forked at) and ``fork-chart.png`` (the Chart view: the same nesting beside the runs'
``loss`` curves, the fork's starting with the source's). The UI shows a child run only under
its unfolded parent, hence the click on the source's expander. Run it by hand when the UI or
the demo changes; pytest never collects it (it is outside ``tests/`` and not named
``test_*``) and CI never runs it: it needs a browser and minutes.

Rerun, from the repository root (the package's venv runs the demo and ``mlflow ui``; a
separate venv holds Playwright, which drives the system's Chromium)::

    apt-get install -y chromium
    python3 -m venv /tmp/shots-venv && /tmp/shots-venv/bin/pip install playwright pillow
    /tmp/shots-venv/bin/python docs/images/take_screenshots.py --data-dir /tmp/shots-data \\
        --python .venv/bin/python --mlflow .venv/bin/mlflow --port 5055

``--only demo`` makes the first two pictures, ``--only fork`` the fork's two (then
``--data-dir`` may be left out); the fork's data dir is ``--fork-data-dir``
(``/tmp/shots-fork-data`` by default).

Never run ``playwright install``: it downloads a browser of its own; ``--chromium`` names the
one to drive. A data dir without ``mlflow.db`` is first filled by ``examples/train_and_resume.py``
(about two minutes); one that has it is reused, its newest run of ``--experiment`` shown. A fork
data dir without it is filled by ``examples/fork_after_spike.py`` (under a minute); its runs are
found by the names that example gives them. For each data dir the script starts ``mlflow ui``
on ``--host``/``--port`` (its log: ``mlflow-ui.log`` in the data dir) and stops it when done.
The viewport is 1800x900 by default: at 1600 px the Models tab cannot show the sidebar's
"Model training" switch and the checkpoint's columns together. The Artifacts view prints the
file's absolute path, so the data dir's name is in the picture; the fork's pictures are cropped
below what they show (the table's rows, the chart), as ``timeline.png`` is below the image.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from PIL import Image
from playwright.sync_api import FloatRect, Page, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
EXAMPLE = REPO / "examples" / "train_and_resume.py"
FORK_EXAMPLE = REPO / "examples" / "fork_after_spike.py"
# What examples/fork_after_spike.py makes: its experiment, the source run and the fork.
FORK_EXPERIMENT, FORK_SOURCE, FORK_RUN = "mlflow-ckpt-fork", "restart-too-high", "restart-lower"
# Flags for a headless Chromium that talks to nothing but the local UI.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Columns hidden on the Models tab so that the checkpoint's metrics and parameters fit beside
# its name: (group to unfold or None, column).
HIDDEN_COLUMNS = [
    (None, "Status"),
    (None, "Logged from"),
    (None, "Registered models"),
    (None, "Dataset"),
    ("No dataset", "lr"),
    ("Parameters", "format"),
]
# Columns of the fork's runs table, found through the Columns menu's search box: (column,
# shown). The Dataset column is empty; the others tell the two runs apart.
FORK_COLUMNS = [
    ("Dataset", False),
    ("restart_lr", True),
    ("loss", True),
    ("mlflow_ckpt.forked_from_step", True),
]
TREE_NODE = ".du-bois-light-tree-treenode"  # one entry of the UI's "Columns" menu
RUN_NAME_CELL = '[role=gridcell][col-id="attributes.`Run Name`"]'  # in the table and chart view
WAIT_MS = 60_000  # a page of the UI can take long on a busy machine
ASSISTANT_WAIT_MS = 10_000
MAX_PNG_BYTES = 400_000
Shooter = Callable[[argparse.Namespace, str], None]  # takes the pictures of one served data dir


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, help="holds mlflow.db + mlruns/ (the demo's)")
    parser.add_argument(
        "--fork-data-dir",
        type=Path,
        default=Path("/tmp/shots-fork-data"),
        help="holds fork_after_spike.py's mlflow.db + mlruns/",
    )
    parser.add_argument(
        "--only", choices=["demo", "fork"], help="only the demo's or only the fork's pictures"
    )
    parser.add_argument("--out-dir", type=Path, default=HERE, help="where the PNGs go")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5055, help="port for `mlflow ui`")
    parser.add_argument("--mlflow", default="mlflow", help="the `mlflow` command to serve the UI")
    parser.add_argument("--python", default=sys.executable, help="runs the demo (needs torch)")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--experiment", default="mlflow-ckpt-demo")
    parser.add_argument("--width", type=int, default=1800, help="viewport width (px)")
    parser.add_argument("--height", type=int, default=900, help="viewport height (px)")
    args = parser.parse_args()
    if args.data_dir is None and args.only != "fork":
        parser.error("--data-dir is needed unless --only fork")
    return args


def child_env(data_dir: Path) -> dict[str, str]:
    """The environment of the demo and the UI: this checkout's package, no telemetry."""
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{data_dir / 'mlflow.db'}"
    return env


def ensure_data(data_dir: Path, python: str, example: Path) -> None:
    """Fill an empty data dir with an example's runs: the demo's (kill, preemption, resume: many
    checkpoints) or the fork's (a source run and a fork of it)."""
    if (data_dir / "mlflow.db").exists():
        return
    data_dir.mkdir(parents=True, exist_ok=True)
    print(f"running {example.name} into {data_dir} ...", flush=True)
    subprocess.run([python, str(example)], cwd=data_dir, env=child_env(data_dir), check=True)


def start_ui(args: argparse.Namespace, data_dir: Path) -> subprocess.Popen[bytes]:
    """``mlflow ui`` in a session of its own, so that stopping it also stops its workers."""
    db = f"sqlite:///{data_dir / 'mlflow.db'}"
    cmd = [args.mlflow, "ui", "--backend-store-uri", db, "--host", args.host]
    log = (data_dir / "mlflow-ui.log").open("wb")
    return subprocess.Popen(
        [*cmd, "--port", str(args.port)],
        cwd=data_dir,
        env=child_env(data_dir),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_ui(ui: subprocess.Popen[bytes]) -> None:
    """Stop the UI's own process group (only what ``start_ui`` started), as Ctrl+C would.

    Its job-runner workers take ~30 s to finish on SIGINT/SIGTERM; after 60 s, or if any of
    them outlive the server, the group gets SIGKILL.
    """
    if ui.poll() is None:
        os.killpg(ui.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            ui.wait(timeout=60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(ui.pid, signal.SIGKILL)
    ui.wait()


def wait_until_up(base: str, ui: subprocess.Popen[bytes], timeout_s: float = 180) -> None:
    """Poll ``/health`` until the server answers; the first start migrates the DB (slow)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ui.poll() is not None:
            raise SystemExit(f"mlflow ui exited with status {ui.returncode} (see mlflow-ui.log)")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    raise SystemExit(f"mlflow ui did not answer at {base} within {timeout_s:.0f} s")


def api(base: str, path: str, body: dict[str, object] | None = None) -> dict:
    """One call to the tracking server's REST API (GET, or POST with a JSON body)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"{base}/api/2.0/mlflow/{path}", data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)


def experiment_id(base: str, experiment: str) -> str:
    """The ID of the experiment of that name."""
    return api(base, f"experiments/get-by-name?experiment_name={experiment}")["experiment"][
        "experiment_id"
    ]


def newest_run(base: str, experiment: str) -> tuple[str, str, str]:
    """(experiment ID, run ID, run name) of the experiment's newest run."""
    exp_id = experiment_id(base, experiment)
    query = {"experiment_ids": [exp_id], "order_by": ["start_time DESC"]}
    found = api(base, "runs/search", {**query, "max_results": 1})
    if not found.get("runs"):
        raise SystemExit(f"experiment {experiment!r} has no run")
    info = found["runs"][0]["info"]
    return exp_id, info["run_id"], info["run_name"]


def close_assistant(page: Page) -> None:
    """Close the "MLflow Assistant" panel that the 3.17 UI opens beside a page: it hides the table.

    It comes a moment after the page; once closed it stays closed in this browser session.
    """
    chat_box = page.get_by_placeholder("Ask a question...")  # the panel's own input
    try:
        chat_box.wait_for(timeout=ASSISTANT_WAIT_MS)
    except PlaywrightTimeoutError:
        return
    page.get_by_role("button", name="Close", exact=True).click()
    chat_box.wait_for(state="hidden")


def hide_columns(page: Page) -> None:
    """Untick ``HIDDEN_COLUMNS`` in the Columns menu.

    The menu is a virtualized tree: a column inside a folded group is not in the page until
    the group is unfolded, and two unfolded groups push the last entries out of it, so each
    group is unfolded, used and folded again.
    """
    page.get_by_role("button", name="Columns", exact=True).click()

    def node(label: str):
        return page.locator(TREE_NODE).filter(has=page.get_by_text(label, exact=True))

    for group, label in HIDDEN_COLUMNS:
        if group is not None:
            node(group).locator(".du-bois-light-tree-switcher").click()
        node(label).locator(".du-bois-light-tree-checkbox").click()
        page.get_by_role("columnheader", name=label, exact=True).wait_for(state="detached")
        if group is not None:
            node(group).locator(".du-bois-light-tree-switcher").click()
            node(label).wait_for(state="detached")
    page.keyboard.press("Escape")


def pick_columns(page: Page, columns: list[tuple[str, bool]]) -> None:
    """Tick or untick each column in the Columns menu, found through the menu's search box,
    then widen each shown one to fit its values (a double click on its header's edge).

    The search keeps only the matching entries in the (virtualized) tree, however long the
    list of tags: no group to unfold. A column already as wanted is left alone.
    """
    page.get_by_role("button", name="Columns", exact=True).click()
    search = page.get_by_placeholder("Search columns")
    for label, shown in columns:
        search.fill(label)
        node = page.locator(TREE_NODE).filter(has=page.get_by_text(label, exact=True))
        header = page.get_by_role("columnheader", name=label, exact=True).first
        if (header.count() > 0) != shown:
            node.locator(".du-bois-light-tree-checkbox").click()
        header.wait_for(state="visible" if shown else "detached")
    search.fill("")
    page.keyboard.press("Escape")
    for label, shown in columns:  # as wide as their values (a metric's has ~17 digits)
        if shown:
            header = page.locator(".ag-header-cell").filter(has=page.get_by_text(label, exact=True))
            header.locator(".ag-header-cell-resize").dblclick()


def unfold_source(page: Page) -> None:
    """Click the source run's expander and check that the fork shows, indented under it."""
    source = page.locator(RUN_NAME_CELL).filter(has_text=FORK_SOURCE)
    source.get_by_role("button").click()
    fork = page.get_by_role("link", name=FORK_RUN, exact=True)
    fork.wait_for()
    parent = page.get_by_role("link", name=FORK_SOURCE, exact=True).bounding_box()
    child = fork.bounding_box()
    if not (parent and child and child["x"] > parent["x"] and child["y"] > parent["y"]):
        raise SystemExit(f"{FORK_RUN!r} is not shown nested under {FORK_SOURCE!r}")


def viewport(page: Page) -> tuple[int, int]:
    """(width, height) of the page's viewport: always set, the pages are opened with one."""
    size = page.viewport_size
    if size is None:
        raise SystemExit("the page has no viewport size")
    return size["width"], size["height"]


def settle(page: Page) -> None:
    """No focus ring and no hovered row in the picture."""
    page.evaluate("() => document.activeElement && document.activeElement.blur()")
    page.mouse.move(viewport(page)[0] - 2, 2)
    page.wait_for_timeout(300)  # the hover highlight fades out


def save_png(png: bytes, path: Path) -> None:
    """Write a screenshot losslessly when it is small enough, else with 256 colours.

    Quantizing shrinks a UI picture ~3x but shifts the UI's per-model colour dots, so it is
    only the fallback for a picture over ``MAX_PNG_BYTES`` (what the README can carry).
    """
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image.save(path, optimize=True)
    if path.stat().st_size > MAX_PNG_BYTES:
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    print(f"{path}: {image.width}x{image.height}, {path.stat().st_size / 1024:.0f} KB")


def shoot_models(page: Page, base: str, experiment_id: str, run_name: str, out: Path) -> None:
    """The Models tab: a row per checkpoint with train_loss/val_loss and step/epoch/trigger."""
    page.goto(f"{base}/#/experiments/{experiment_id}/models?workflowType=machine_learning")
    page.get_by_text(run_name, exact=True).first.wait_for(timeout=WAIT_MS)  # the rows are in
    close_assistant(page)
    hide_columns(page)  # the grid renders only the columns in view: look for them afterwards
    for column in ("train_loss", "val_loss", "step", "trigger"):
        page.get_by_role("columnheader", name=column, exact=True).wait_for()
    settle(page)
    save_png(page.screenshot(), out)


def shoot_timeline(page: Page, base: str, experiment_id: str, run_id: str, out: Path) -> None:
    """The run's Artifacts view with mlflow_ckpt/timeline.png selected, cropped below the image."""
    artifact = "mlflow_ckpt/timeline.png"
    page.goto(
        f"{base}/#/experiments/{experiment_id}/runs/{run_id}/artifacts/{artifact}"
        "?workflowType=machine_learning"
    )
    image = page.get_by_role("img", name=artifact, exact=True)
    image.wait_for(timeout=WAIT_MS)
    page.wait_for_function(
        "alt => [...document.images].some(i => i.alt === alt && i.complete && i.naturalWidth > 0)",
        arg=artifact,
    )
    close_assistant(page)
    settle(page)
    save_above(page, image.bounding_box(), out)


def save_above(page: Page, box: FloatRect | None, out: Path, margin: int = 40) -> None:
    """Save the viewport's full width down to the bottom of ``box`` plus ``margin`` (px)."""
    width, height = viewport(page)
    clip_height = height if box is None else min(height, int(box["y"] + box["height"]) + margin)
    save_png(page.screenshot(clip={"x": 0, "y": 0, "width": width, "height": clip_height}), out)


def shoot_fork_runs(page: Page, base: str, experiment_id: str, out: Path) -> None:
    """The runs table, the source unfolded: the fork nested under it, cropped below the rows."""
    page.goto(f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
    page.get_by_role("link", name=FORK_SOURCE, exact=True).wait_for(timeout=WAIT_MS)
    close_assistant(page)
    unfold_source(page)
    pick_columns(page, FORK_COLUMNS)
    settle(page)
    save_above(page, page.locator(RUN_NAME_CELL).filter(has_text=FORK_RUN).bounding_box(), out)


def shoot_fork_chart(page: Page, out: Path) -> None:
    """The Chart view after ``shoot_fork_runs``: the runs list (still unfolded) beside the
    ``loss`` chart, which is dragged wider and taller by its corner, cropped below it."""
    page.locator("label").filter(has=page.locator('input[value="CHART"]')).click()
    page.get_by_role("link", name=FORK_RUN, exact=True).wait_for(timeout=WAIT_MS)
    handle = page.get_by_test_id("draggable-card-resize-handle").first  # the loss chart's
    handle.wait_for(timeout=WAIT_MS)
    corner = handle.bounding_box()
    if corner is None:
        raise SystemExit("the loss chart is not in view")
    page.mouse.move(corner["x"] + 4, corner["y"] + 4)
    page.mouse.down()  # the grid snaps the card to full width and its tallest height
    width, height = viewport(page)
    page.mouse.move(width - 60, height - 40, steps=20)
    page.mouse.up()
    page.wait_for_timeout(1_000)  # the chart redraws at its new size
    settle(page)
    save_above(page, handle.bounding_box(), out, margin=12)  # the next section is 30 px below


def shoot_demo(args: argparse.Namespace, base: str) -> None:
    experiment_id, run_id, run_name = newest_run(base, args.experiment)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            shoot_models(page, base, experiment_id, run_name, args.out_dir / "models-tab.png")
            shoot_timeline(page, base, experiment_id, run_id, args.out_dir / "timeline.png")
        finally:
            browser.close()


def shoot_fork(args: argparse.Namespace, base: str) -> None:
    exp_id = experiment_id(base, FORK_EXPERIMENT)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            shoot_fork_runs(page, base, exp_id, args.out_dir / "fork-runs.png")
            shoot_fork_chart(page, args.out_dir / "fork-chart.png")
        finally:
            browser.close()


def with_ui(args: argparse.Namespace, data_dir: Path, example: Path, shoot: Shooter) -> None:
    """Fill the data dir if empty, serve it with ``mlflow ui``, take its pictures, stop the UI."""
    data_dir = data_dir.resolve()
    ensure_data(data_dir, args.python, example)
    base = f"http://{args.host}:{args.port}"
    ui = start_ui(args, data_dir)
    try:
        wait_until_up(base, ui)
        shoot(args, base)
    finally:
        stop_ui(ui)


def main() -> None:
    args = parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.only != "fork":
        with_ui(args, args.data_dir, EXAMPLE, shoot_demo)
    if args.only != "demo":
        with_ui(args, args.fork_data_dir, FORK_EXAMPLE, shoot_fork)


if __name__ == "__main__":
    main()

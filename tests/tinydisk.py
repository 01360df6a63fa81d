"""A tiny real filesystem (tmpfs) that a save can fill up: shared by tests and benchmarks."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import torch


@contextlib.contextmanager
def tmpfs(mount: Path, size: str = "8m") -> Iterator[Path]:
    """Mount a tmpfs of ``size`` at ``mount``; ``RuntimeError`` saying why when impossible."""
    mount.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        raise RuntimeError("mounting a tmpfs needs root; CI runs as root")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)


def training_state(seed: int = 0) -> dict[str, object]:
    """About 3 MiB of state: 1 MiB of weights, 2 MiB of AdamW moments."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(512, 512)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 512)).sum().backward()
    opt.step()
    return {"model": model, "optimizer": opt}


def fill(mount: Path, leave: int) -> Path:
    """Leave about ``leave`` bytes free on ``mount``; return the filler file."""
    stat = os.statvfs(mount)
    filler = mount / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))
    return filler


def files(mount: Path) -> list[Path]:
    """Every file on ``mount`` but the filler, sorted."""
    return sorted(p for p in mount.rglob("*") if p.is_file() and p.name != "filler")

"""Comparisons timed in interleaved pairs: the only ratios this machine's disk allows.

The disk here swings about 3x between runs minutes apart (600 MB written and fsynced in
0.59 s, then 2.24 s), so "A five times, then B five times" compares the disk's mood at two
moments, not A with B. Timing A and B back to back, pair after pair, exposes both to the
same moment; the ratio *within* each pair is the evidence, and the median of those ratios,
with its min-max spread, is what a comparison reports.

The order inside a pair alternates (A B, B A, A B, ...): whatever one call leaves behind
(dirty pages still being written back, a warm page cache, freed memory) falls on A and on B
equally often.

    result = interleaved(save_ours, save_dcp, pairs=5, setup=train_step)
    print(result.describe())  # "1.24x (1.10-1.41, 5 pairs; A 0.61 s, B 0.49 s median)"
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class PairResult:
    """Times of A and B, pair by pair (``a_times[i]`` and ``b_times[i]`` ran back to back)."""

    a_times: tuple[float, ...]
    b_times: tuple[float, ...]

    @property
    def ratios(self) -> tuple[float, ...]:
        """A / B within each pair."""
        return tuple(a / b for a, b in zip(self.a_times, self.b_times, strict=True))

    @property
    def median_ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def min(self) -> float:
        """The smallest per-pair ratio (the spread's lower end)."""
        return min(self.ratios)

    @property
    def max(self) -> float:
        """The largest per-pair ratio (the spread's upper end)."""
        return max(self.ratios)

    def describe(self) -> str:
        """``median (min-max, n pairs; A and B medians)``, for a table cell or a log line."""
        return (
            f"{self.median_ratio:.2f}x ({self.min:.2f}-{self.max:.2f}, "
            f"{len(self.ratios)} pairs; A {statistics.median(self.a_times):.3f} s, "
            f"B {statistics.median(self.b_times):.3f} s median)"
        )

    def as_json(self) -> dict[str, object]:
        return {
            "median_ratio": self.median_ratio,
            "min_ratio": self.min,
            "max_ratio": self.max,
            "ratios": list(self.ratios),
            "a_times": list(self.a_times),
            "b_times": list(self.b_times),
        }


def interleaved(
    a: Callable[[], object],
    b: Callable[[], object],
    *,
    pairs: int = 5,
    setup: Callable[[], object] | None = None,
    warmup: bool = True,
) -> PairResult:
    """Time ``a`` and ``b`` in ``pairs`` back-to-back pairs, alternating which goes first.

    ``setup`` runs (untimed) before every timed call, e.g. a training step, so that each
    save sees a state that changed since the last one. ``warmup`` runs each once, untimed,
    first: the first call of anything pays for imports, allocations and a cold cache.
    """
    if pairs < 1:
        raise ValueError(f"pairs must be at least 1, got {pairs}")

    def timed(fn: Callable[[], object]) -> float:
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    if warmup:
        timed(a)
        timed(b)
    a_times: list[float] = []
    b_times: list[float] = []
    for i in range(pairs):
        if i % 2 == 0:
            a_times.append(timed(a))
            b_times.append(timed(b))
        else:
            b_times.append(timed(b))
            a_times.append(timed(a))
    return PairResult(tuple(a_times), tuple(b_times))

"""Timing shared by the benchmark scripts: wall and CPU seconds of a call, and medians of repeats
(CPU time counts this process's threads; it is steadier than wall time on a shared machine)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall and CPU seconds of one ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def median_times(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds of ``repeats`` calls."""
    walls, cpus = zip(*(timed(fn) for _ in range(repeats)), strict=True)
    return statistics.median(walls), statistics.median(cpus)

"""How many CPU threads each process of a run uses: ``--threads``, else ``OMP_NUM_THREADS``, else
this machine's cores not busy at start split over the processes.

Why not torch's default (one thread per core): on this project's 2-core machine with one other
busy process, 2 threads ran a training step 3x slower than 1 (35 s vs 12 s for the same 20
steps; OpenMP threads spin waiting for a core the neighbour holds), while on an idle machine 2
were 1.3x faster than 1 (BENCHMARKS.md, "Threads"). So a run takes the cores that are free when
it starts. "Busy" is measured, not guessed from the load average: that is a one-minute mean
which counts a neighbour started 30 s ago as 0.4 of a core and one stopped 30 s ago as 0.6.
Pure Python: the launcher reads it without importing torch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

ENV = "OMP_NUM_THREADS"


@dataclass(frozen=True)
class Threads:
    """``count`` threads per process, and why (for the run's header)."""

    count: int
    why: str

    def __str__(self) -> str:
        return f"{self.count} thread{'s' if self.count != 1 else ''} per process ({self.why})"


def cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat (None elsewhere)."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already in user/nice
    return total - idle, total


def busy_cores(sample_s: float = 0.2) -> float:
    """Cores other work keeps busy now: the machine's CPU use over ``sample_s`` seconds (this
    process sleeps meanwhile); the 1-minute load average where /proc/stat is missing."""
    first = _cpu_times()
    if first is None:
        try:
            return os.getloadavg()[0]
        except (AttributeError, OSError):
            return 0.0
    time.sleep(sample_s)
    second = _cpu_times()
    spent = second[1] - first[1] if second else 0
    if not spent:
        return 0.0
    return (second[0] - first[0]) / spent * (os.cpu_count() or 1)


def free_cores(total: int, busy: float) -> int:
    """Cores of the ``total`` this process may use that other work does not hold: ``busy``
    rounded to whole cores (a neighbour spinning one core counts 1), at least one."""
    return max(total - min(int(busy + 0.5), total - 1), 1)


def choose_threads(processes: int = 1, *, given: int | None = None,
                   environ: Mapping[str, str] | None = None, total: int | None = None,
                   busy: float | None = None) -> Threads:
    """Threads for each of ``processes`` processes started on this machine now.

    ``given`` (``--threads``) wins, then ``OMP_NUM_THREADS`` (what ``accelerate launch`` and
    ``torchrun`` hand each rank), then the free cores over the processes (at least 1 each).
    ``environ``, ``total`` and ``busy`` default to this machine's (tests fake them).
    """
    if given is not None:
        return Threads(int(given), "--threads")
    environ = os.environ if environ is None else environ
    value = str(environ.get(ENV, "")).strip()
    if value.isdigit() and int(value) > 0:
        return Threads(int(value), f"{ENV}={value}")
    total = cores() if total is None else total
    busy = busy_cores() if busy is None else busy
    free = free_cores(total, busy)
    share = max(free // max(processes, 1), 1)
    split = f", over {processes} processes" if processes > 1 else ""
    return Threads(share, f"{free} of {total} cores free, {busy:.1f} busy at start{split}")

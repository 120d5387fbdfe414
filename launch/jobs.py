"""A job of the pool (launch.pool) and what the pool knows of it: its states, its status, and
what its log says (the stage headers and per-epoch lines ``fit`` prints, its last lines)."""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

QUEUED, RUNNING, DONE, REUSED = "queued", "running", "done", "done earlier"
FAILED, STOPPED, SKIPPED, NOT_STARTED = "failed", "stopped", "skipped", "not started"
ENDED_OK = (DONE, REUSED)


@dataclass
class Job:
    """One process of a study: its command, log file and what it needs."""

    name: str
    argv: list[str]
    log: Path
    gpus: int = 1  # GPUs it takes on a GPU pool (a CPU job takes one slot)
    deps: tuple[str, ...] = ()  # jobs that must end first
    after_any: bool = False  # starts once they ended, even if one failed (else skipped)
    epochs: int = 0  # epochs it trains (its ETA)
    outputs: tuple[Path, ...] = ()  # its files (--resume skips a job whose files are unchanged)
    port: bool = False  # several processes: a rendezvous port of its own
    threads: int | None = None  # its OMP_NUM_THREADS (None: the pool's)


@dataclass
class Status:
    """What the pool knows of a job while it runs and after."""

    state: str = QUEUED
    gpus: list[str] = field(default_factory=list)
    port: int | None = None
    start: float | None = None
    end: float | None = None
    code: int | None = None
    note: str = ""
    stage: str = ""
    epoch: str = ""
    acc: float | None = None
    epochs_done: int = 0
    epoch_s: list[float] = field(default_factory=list)
    mark: float = 0.0  # when the last stage header or epoch line came
    proc: subprocess.Popen | None = None
    offset: int = 0  # of the log, read so far
    partial: str = ""
    outputs: dict[str, int] = field(default_factory=dict)  # path -> mtime_ns when it ended


STAGE = re.compile(r"^== (?:\d+\. )?(.+?)\s*$")
EPOCH = re.compile(r"^epoch (\d+)/(\d+)\s.*?test loss \S+ acc ([\d.]+)%")


def read_lines(log: Path, st: Status) -> list[str]:
    """The whole lines ``log`` gained since the last call (``st`` keeps the offset and the
    unfinished last line); a progress bar's carriage returns keep only what shows last."""
    try:
        with open(log, encoding="utf-8", errors="replace") as fh:
            fh.seek(st.offset)
            text = fh.read()
            st.offset = fh.tell()
    except OSError:
        return []
    lines = (st.partial + text).split("\n")
    st.partial = lines.pop()
    return [line.split("\r")[-1] for line in lines]


def read_progress(st: Status, line: str) -> bool:
    """Take in one log line: a stage header or an epoch line (True for an epoch)."""
    now = time.time()
    stage = STAGE.match(line)
    if stage:
        st.stage, st.epoch, st.mark = stage.group(1), "", now
        return False
    epoch = EPOCH.match(line)
    if not epoch:
        return False
    st.epoch = f"{epoch.group(1)}/{epoch.group(2)}"
    st.acc = float(epoch.group(3))
    st.epochs_done += 1
    st.epoch_s.append(now - st.mark)
    st.mark = now
    return True


def eta(job: Job, st: Status) -> str:
    """Time left of a running job, from its mean epoch so far ('?' before the first)."""
    if st.state != RUNNING:
        return ""
    if not st.epoch_s:
        return "?"
    left = max(job.epochs - st.epochs_done, 0)
    return hms(left * sum(st.epoch_s) / len(st.epoch_s))


def tail(path: Path, n: int) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ["(no log)"]
    lines = [ln.split("\r")[-1].rstrip() for ln in text.splitlines()]
    return [ln for ln in lines if ln.strip()][-n:] or ["(empty log)"]


def hms(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"

"""Running a launched job: signals passed on, the stderr relay, and how the ranks ended.

A rank that fails or stops on a signal says so in ``rank<R>.txt`` in the folder named by env
``SLIMTUNE_FAILURE_DIR`` (``trainer.train.dist.report_to_launcher``): first line the one-line
message, optionally a line ``exit_code=N``; the launcher prints those as its last lines, the
root cause last.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from launch.accelerate_config import process_count
from trainer.errors import HardStop, UserError
from trainer.train.dist import FAILURE_DIR_ENV, is_consequence, is_stop

STOP_WAIT_S = 120.0  # how long to wait for workers to save and exit after a forwarded signal


def local_ranks(config: dict) -> range:
    """Global ranks of the processes this machine starts for ``config``."""
    total, machines = process_count(config), max(int(config.get("num_machines", 1)), 1)
    per = max(total // machines, 1)
    first = int(config.get("machine_rank", 0)) * per
    return range(first, first + per)


def run_job(argv: list[str], env: dict[str, str], ranks: range | None = None) -> int:
    """Run the launch command (no shell); forward SIGINT/SIGTERM; report failed ranks; end
    any rank the job leaves behind.

    ``ranks``: the global ranks started here; one that fails without writing a report (killed
    by SIGKILL or the out-of-memory killer) is then named instead of a peer that lost it.
    """
    failure_dir = Path(tempfile.mkdtemp(prefix="slimtune-failures-"))
    marker = f"{FAILURE_DIR_ENV}={failure_dir}"  # in the environment of every process of the job
    try:
        code, signum, relay, hard = _run_forwarding_signals(
            argv, {**env, FAILURE_DIR_ENV: str(failure_dir)})
        strays = end_strays(marker)
        reports = read_failures(failure_dir)
        # torchrun's own report (its elastic log and ChildFailedError) only repeats what the
        # ranks said: shown only when no rank said anything
        quiet = code == 0 or bool(reports) or bool(strays) or signum is not None
        relay.finish(show_held=not quiet)
        if code != 0 and strays and signum is None:
            return _report_lost_agent(code, strays, reports)
        return _report(code, signum, failure_dir, ranks, hard) if code != 0 else 0
    finally:
        shutil.rmtree(failure_dir, ignore_errors=True)


STRAY_GRACE_S = 5.0  # a rank left by a dead agent stops at its next step, else is killed


def end_strays(marker: str) -> list[int]:
    """End what is left of a job once its ``accelerate launch`` process is gone: torchrun starts
    each rank in a session of its own, so when that process dies (SIGKILL, the out-of-memory
    killer) its ranks live on, reparented, still training and writing the outputs. They are
    found by ``marker`` (an ``ENV=value`` only this job's processes have), SIGTERMed (they stop
    at the next step and report it), and SIGKILLed after STRAY_GRACE_S. Returns their pids."""
    found = _job_processes(marker)
    ranks = [pid for pid, ranked in found.items() if ranked]
    for pid in ranks:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + STRAY_GRACE_S
    while ranks and time.monotonic() < deadline and any(_alive(p) for p in ranks):
        time.sleep(0.1)
    for pid in _job_processes(marker):
        _signal(pid, signal.SIGKILL)
    return sorted(ranks or found)


def _job_processes(marker: str) -> dict[int, bool]:
    """{pid: is a rank} of the live processes whose environment holds ``marker``."""
    needle, found = marker.encode(), {}
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in environ and _alive(int(entry.name)):
            found[int(entry.name)] = any(e.startswith(b"LOCAL_RANK=") for e in environ)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _report_lost_agent(code: int, strays: list[int], reports) -> int:
    """The job's agent died (not a rank): say so last; the ranks' own stop lines before it."""
    for rank, message, _ in reports:
        print(f"rank {rank} {message}" if is_stop(message) else
              f"error: rank {rank} failed: {message}", file=sys.stderr)
    how = f"killed by {signal.Signals(code - 128).name}" if code > 128 else f"exit code {code}"
    print(f"error: the job's accelerate launch process ended ({how}) while its ranks ran; "
          f"they were stopped (pids {', '.join(map(str, strays))}); add --resume to continue "
          "from the last finished epoch", file=sys.stderr)
    return code


class _StderrRelay:
    """Copies the job's stderr to ours line by line as it comes, holding back torchrun's own
    failure output: its elastic log lines and the ChildFailedError traceback it prints after
    every rank ended. ``finish`` prints those unless the launcher's report says it all."""

    ELASTIC = re.compile(r"[IWE]\d{4} [\d:.]+ +\d+ \S*torch/distributed/elastic/")

    def __init__(self, stream) -> None:
        self.held: list[str] = []
        self.block: list[str] | None = None  # a traceback, until its exception line
        self.agent_tail = False  # after ChildFailedError: the agent's summary, to the end
        self.thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self.thread.start()

    def _pump(self, stream) -> None:
        for line in stream:
            self._line(line)
        self._out(self.block or [])

    def _line(self, line: str) -> None:
        if self.agent_tail or self.ELASTIC.match(line):
            self.held.append(line)
        elif self.block is None and line.startswith("Traceback (most recent call last):"):
            self.block = [line]
        elif self.block is None:
            self._out([line])
        else:  # a traceback ends at its first unindented line (the exception)
            self.block.append(line)
            if line[:1].isspace() or line.startswith("Traceback"):
                return
            if "ChildFailedError" in line:  # torchrun's: every rank has ended by now
                self.held += self.block
                self.agent_tail = True
            else:  # a rank's crash: shown as it comes
                self._out(self.block)
            self.block = None

    @staticmethod
    def _out(lines: list[str]) -> None:
        try:
            sys.stderr.write("".join(lines))
            sys.stderr.flush()
        except (OSError, ValueError):  # our stderr is gone: keep draining, or the ranks block
            pass

    def finish(self, show_held: bool) -> None:
        self.thread.join(timeout=10)  # EOF once the job's processes are gone
        if show_held:
            self._out(self.held)


def one_user_error(reports: list[tuple[int, str, int | None]], signum: int | None,
                   ranks: range | None) -> str | None:
    """The message when the job failed on bad input (exit code 2) and nothing else: every
    rank that reported a cause reported that one (the ranks check their input alike, or one
    rank read the bad file), every other rank only lost it or was stopped, and every rank
    started here reported. The user should read it once, as in one process."""
    if signum is not None or not reports:
        return None
    roots = [r for r in reports if not is_consequence(r[1])]
    if not roots or len({m for _, m, _ in roots}) != 1:
        return None
    if any(c != UserError.exit_code for _, _, c in roots):
        return None
    if not ranks or not set(ranks) <= {r for r, _, _ in reports}:  # a rank died without a word
        return None
    return roots[0][1]


def _run_forwarding_signals(argv: list[str], env: dict[str, str]
                            ) -> tuple[int, int | None, _StderrRelay, bool]:
    """Start ``argv`` in its own process group; pass SIGINT/SIGTERM on to that whole group.

    Own group: a terminal Ctrl-C then reaches the job once (through us), not twice. Returns the
    exit code (128 + signal for a signal death), the last signal forwarded, if any, the
    _StderrRelay the job's stderr goes through, and whether a second Ctrl-C came.
    """
    state: dict = {"proc": None, "signum": None, "interrupts": 0}

    def forward(signum, _frame):
        state["signum"] = signum
        state["interrupts"] += signum == signal.SIGINT
        if state["proc"] is not None:
            killpg(state["proc"].pid, signum)

    main = threading.current_thread() is threading.main_thread()
    sigs = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.signal(s, forward) for s in sigs} if main else {}
    try:
        state["proc"] = proc = subprocess.Popen(
            argv, env=env, start_new_session=True, preexec_fn=end_with_launcher(),
            stderr=subprocess.PIPE)
        # newline="": a progress bar's \r stays in its line
        relay = _StderrRelay(io.TextIOWrapper(proc.stderr, errors="replace", newline=""))
        if state["signum"] is not None:  # arrived while starting
            killpg(proc.pid, state["signum"])
        code = proc.wait()
        if state["signum"] is not None:
            _wait_group_gone(proc.pid)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    hard = state["interrupts"] > 1  # a second Ctrl-C: the ranks stopped hard (HardStop)
    return (128 - code if code < 0 else code), state["signum"], relay, hard


def end_with_launcher():
    """A ``preexec_fn`` that has Linux send SIGTERM to the job when the launcher dies.

    The job runs in its own session, so without it a launcher killed by SIGKILL (or the
    out-of-memory killer) would leave every rank training, detached. SIGTERM lets the ranks
    stop at a step boundary like a forwarded one. None (no hook) where there is no prctl.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    launcher = os.getpid()

    def hook() -> None:
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
        if os.getppid() != launcher:  # the launcher died before the hook ran
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


def killpg(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_group_gone(pgid: int) -> None:
    """After a forwarded signal: let workers left in the group finish saving (<= STOP_WAIT_S)."""
    deadline = time.monotonic() + STOP_WAIT_S
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    """Any live (non-zombie) process left in group ``pgid``? Uses /proc where there is one."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").is_file():
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def read_failures(failure_dir: Path) -> list[tuple[int, str, int | None]]:
    """``(rank, message, exit_code or None)`` from ``rank<R>.txt`` files, by rank."""
    failures = []
    for path in failure_dir.glob("rank*.txt"):
        match = re.fullmatch(r"rank(\d+)\.txt", path.name)
        if not match:
            continue
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        message = next((ln.strip() for ln in lines if ln.strip()), "(no message)")
        codes = [int(m.group(1)) for ln in lines if (m := re.fullmatch(r"exit_code=(\d+)", ln))]
        failures.append((int(match.group(1)), message, codes[0] if codes else None))
    return sorted(failures)


def _report(code: int, signum: int | None, failure_dir: Path, ranks: range | None = None,
            hard: bool = False) -> int:
    """Print a summary, then how the ranks ended, root cause last; pick the exit code."""
    reports = read_failures(failure_dir)
    message = one_user_error(reports, signum, ranks)
    if message:
        print(f"error: {message}", file=sys.stderr)
        return UserError.exit_code
    if signum is not None:  # the launcher passed the signal on: one line says it all
        reports = [r for r in reports if not is_stop(r[1]) and r[1] != HardStop.MESSAGE]
    silent = _silent_ranks(reports, ranks) if signum is None else []
    if signum is not None and hard:
        print(f"stopped hard by a second Ctrl-C; the job exited with code {code} (the epoch in "
              "progress is lost; --resume continues from the last finished epoch)",
              file=sys.stderr)
    elif signum is not None:
        print(f"stopped by {signal.Signals(signum).name}; the job exited with code {code}",
              file=sys.stderr)
    elif not reports:
        print(f"error: the launched job failed with exit code {code} and no rank reported "
              "an error; see its output above", file=sys.stderr)
    # A rank that only lost its peer, or that the agent SIGTERMed after a peer died, ended
    # too; print those first so that the root cause is the last line, and take the exit
    # code from the root cause.
    reports.sort(key=lambda r: not is_consequence(r[1]))  # stable: by rank within each group
    for rank, message, _ in reports:
        print(f"rank {rank} {message}" if is_stop(message) else
              f"error: rank {rank} failed: {message}", file=sys.stderr)
    if silent:
        print(f"error: rank {', '.join(map(str, silent))} died without reporting an error "
              "(killed by a signal such as SIGKILL, or by the out-of-memory killer); the "
              "other ranks stopped because they lost it", file=sys.stderr)
        return code
    roots = [r for r in reports if not is_consequence(r[1])] or reports
    codes = [c for _, _, c in roots if c]
    if codes:
        return codes[0]
    return 128 + signum if signum is not None else code


def _silent_ranks(reports: list[tuple[int, str, int | None]], ranks: range | None) -> list[int]:
    """Ranks started here that wrote no report while every report is a consequence (a lost
    peer, a stop): those died without a word (SIGKILL, out of memory) and are the root cause."""
    if not ranks or not reports or not all(is_consequence(m) for _, m, _ in reports):
        return []
    reported = {rank for rank, _, _ in reports}
    return [r for r in ranks if r not in reported]

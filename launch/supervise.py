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
from trainer.errors import UserError
from trainer.train.dist import FAILURE_DIR_ENV, is_consequence, is_stop

STOP_WAIT_S = 120.0  # how long to wait for workers to save and exit after a forwarded signal


def local_ranks(config: dict) -> range:
    """Global ranks of the processes this machine starts for ``config``."""
    total, machines = process_count(config), max(int(config.get("num_machines", 1)), 1)
    per = max(total // machines, 1)
    first = int(config.get("machine_rank", 0)) * per
    return range(first, first + per)


def run_job(argv: list[str], env: dict[str, str], ranks: range | None = None) -> int:
    """Run the launch command (no shell); forward SIGINT/SIGTERM; report failed ranks.

    ``ranks``: the global ranks started here; one that fails without writing a report (killed
    by SIGKILL or the out-of-memory killer) is then named instead of a peer that lost it.
    """
    failure_dir = Path(tempfile.mkdtemp(prefix="slimtune-failures-"))
    try:
        code, signum, relay = _run_forwarding_signals(
            argv, {**env, FAILURE_DIR_ENV: str(failure_dir)})
        one = code != 0 and one_user_error(read_failures(failure_dir), signum, ranks)
        relay.finish(show_held=not one)  # torchrun's report only repeats what every rank said
        return _report(code, signum, failure_dir, ranks) if code != 0 else 0
    finally:
        shutil.rmtree(failure_dir, ignore_errors=True)


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
    """The message when every rank started here reported the same bad input (exit code 2):
    the ranks check their input alike, and the user should read it once."""
    if signum is not None or not reports or len({m for _, m, _ in reports}) != 1:
        return None
    if any(c != UserError.exit_code for _, _, c in reports):
        return None
    if not ranks or not set(ranks) <= {r for r, _, _ in reports}:  # one rank failed alone
        return None
    return reports[0][1]


def _run_forwarding_signals(argv: list[str],
                            env: dict[str, str]) -> tuple[int, int | None, _StderrRelay]:
    """Start ``argv`` in its own process group; pass SIGINT/SIGTERM on to that whole group.

    Own group: a terminal Ctrl-C then reaches the job once (through us), not twice. Returns the
    exit code (128 + signal for a signal death), the last signal forwarded, if any, and the
    _StderrRelay the job's stderr goes through.
    """
    state: dict = {"proc": None, "signum": None}

    def forward(signum, _frame):
        state["signum"] = signum
        if state["proc"] is not None:
            _killpg(state["proc"].pid, signum)

    main = threading.current_thread() is threading.main_thread()
    sigs = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.signal(s, forward) for s in sigs} if main else {}
    try:
        state["proc"] = proc = subprocess.Popen(
            argv, env=env, start_new_session=True, preexec_fn=_end_with_launcher(),
            stderr=subprocess.PIPE)
        # newline="": a progress bar's \r stays in its line
        relay = _StderrRelay(io.TextIOWrapper(proc.stderr, errors="replace", newline=""))
        if state["signum"] is not None:  # arrived while starting
            _killpg(proc.pid, state["signum"])
        code = proc.wait()
        if state["signum"] is not None:
            _wait_group_gone(proc.pid)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    return (128 - code if code < 0 else code), state["signum"], relay


def _end_with_launcher():
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


def _killpg(pgid: int, signum: int) -> None:
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


def _report(code: int, signum: int | None, failure_dir: Path, ranks: range | None = None) -> int:
    """Print a summary, then how the ranks ended, root cause last; pick the exit code."""
    reports = read_failures(failure_dir)
    message = one_user_error(reports, signum, ranks)
    if message:
        print(f"error: {message}", file=sys.stderr)
        return UserError.exit_code
    if signum is not None:  # the launcher passed the signal on: one line says it all
        reports = [r for r in reports if not is_stop(r[1])]
    silent = _silent_ranks(reports, ranks) if signum is None else []
    if signum is not None:
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

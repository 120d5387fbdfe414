"""The pool: a study's independent jobs side by side on this machine.

Each job is a ``python -m launch ...`` process of its own: on GPUs, a disjoint set of them
(``CUDA_VISIBLE_DEVICES``) and, for a job of several processes, its own rendezvous port; on the
CPU, its share of the cores (``OMP_NUM_THREADS``). Its output (rank 0's: the ranks' own go
through its launcher) goes to its log file. Jobs start as soon as the jobs they need have
ended and a GPU set (a slot) is free; the rest wait in a queue. A job that fails does not stop
the others: the ones that need it are skipped, the summary names it with the last lines of its
log, and the exit code says the study failed. Ctrl-C or SIGTERM is passed on to every job,
which stops as a single run stops (the epoch in progress is dropped, the last finished one is
kept), and ``--resume`` continues. Progress is read from the logs (the stage headers and the
per-epoch lines of ``fit``): a live table on a terminal, one line per job per epoch elsewhere.
The jobs, their GPUs, ports, times and exit codes are kept in ``jobs.json`` beside the logs.

Torch-free: the pool only starts processes and reads files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from launch.jobs import (
    DONE,
    ENDED_OK,
    FAILED,
    NOT_STARTED,
    QUEUED,
    REUSED,
    RUNNING,
    SKIPPED,
    STOPPED,
    Job,
    Status,
    eta,
    hms,
    read_lines,
    read_progress,
    tail,
)
from launch.supervise import STOP_WAIT_S, end_with_launcher, killpg
from trainer.files.atomic import atomic_write_text

POLL_S = 0.25  # how often the pool looks at its jobs
TAIL_LINES = 8  # lines of a failed job's log in the summary
RECORD = "jobs.json"

class Pool:
    """Runs ``jobs`` (in an order where each comes after the jobs it needs).

    ``gpus``: the physical GPU ids the pool hands out (None: CPU jobs, one slot each);
    ``slots``: jobs at once; ``threads``: OMP_NUM_THREADS of each job (None: as it is);
    ``logs``: the folder of jobs.json; ``resume``: reuse the jobs whose files are unchanged.
    """

    def __init__(self, jobs: list[Job], *, gpus: list[str] | None, slots: int,
                 threads: int | None, logs: Path, resume: bool = False,
                 environ: dict[str, str] | None = None, console: Console | None = None) -> None:
        self.jobs = jobs
        self.status = {j.name: Status() for j in jobs}
        self.free = list(gpus) if gpus is not None else None
        self.slots, self.threads, self.logs, self.resume = slots, threads, logs, resume
        self.environ = dict(os.environ if environ is None else environ)
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.live = self.console.is_terminal
        self.stopping: int | None = None
        self.interrupts = 0
        self.deadline: float | None = None
        self.ports: set[int] = set()
        self._live: Live | None = None
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- the loop

    def run(self) -> int:
        """Run every job; the exit code of the study (0, a failed job's code, 128 + signal)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        if self.resume:
            self._reuse_finished()
        main = threading.current_thread() is threading.main_thread()
        sigs = (signal.SIGINT, signal.SIGTERM)
        old = {s: signal.signal(s, self._on_signal) for s in sigs} if main else {}
        try:
            if self.live:
                with Live(console=self.console, get_renderable=self.table,
                          refresh_per_second=4) as self._live:
                    self._loop()
                self._live = None
            else:
                self._loop()
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
            self._write_record()
        return self._summary()

    def _loop(self) -> None:
        while True:
            self._read_progress()
            for job in self.jobs:
                st = self.status[job.name]
                if st.state == RUNNING and st.proc.poll() is not None:
                    self._read_progress()
                    self._ended(job, st.proc.returncode)
            if self.stopping is None:
                self._start_ready()
            if self.stopping is not None and self.deadline and time.monotonic() > self.deadline:
                self._signal_all(signal.SIGKILL)
            if not any(self.status[j.name].state == RUNNING for j in self.jobs):
                if not self._placeable():
                    break
            time.sleep(POLL_S)
        for job in self.jobs:
            if self.status[job.name].state == QUEUED:
                self.status[job.name].state = NOT_STARTED

    def _placeable(self) -> bool:
        """Whether a queued job can still start (the loop's end when nothing runs)."""
        if self.stopping is not None:
            return False
        queued = [j for j in self.jobs if self.status[j.name].state == QUEUED]
        if queued and self._start_ready() == 0:  # nothing runs and nothing fits: give up
            for job in queued:
                st = self.status[job.name]
                st.state, st.note = FAILED, "could not be placed on the pool's GPUs"
            return False
        return bool(queued)

    def _start_ready(self) -> int:
        """Start every queued job that may start now; how many started."""
        started = 0
        for job in self.jobs:
            st = self.status[job.name]
            if st.state != QUEUED:
                continue
            deps = [self.status[d] for d in job.deps]
            if any(d.state in (QUEUED, RUNNING) for d in deps):
                continue
            bad = [n for n in job.deps if self.status[n].state not in ENDED_OK]
            if bad and not job.after_any:
                st.state, st.note = SKIPPED, f"needs {', '.join(bad)}"
                self._say(f"{job.name}: skipped ({st.note}, which did not finish)")
                continue
            if self._running() >= self.slots:
                break
            if self.free is not None and len(self.free) < job.gpus:
                continue  # a smaller job behind it may fit
            self._start(job, st)
            started += 1
        return started

    def _running(self) -> int:
        return sum(self.status[j.name].state == RUNNING for j in self.jobs)

    # ---------------------------------------------------------------- one job

    def _start(self, job: Job, st: Status) -> None:
        if self.free is not None:
            st.gpus, self.free = self.free[:job.gpus], self.free[job.gpus:]
        st.port = self._new_port() if job.port else None
        argv = job.argv + (["--main-process-port", str(st.port)] if st.port else [])
        env = self.environ | {"PYTHONUNBUFFERED": "1"}  # lines reach the log as they come
        if self.free is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(st.gpus)
        threads = job.threads or self.threads
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        job.log.parent.mkdir(parents=True, exist_ok=True)
        st.start = st.mark = time.time()
        st.state, st.stage, st.epoch, st.acc = RUNNING, "", "", None
        try:
            with open(job.log, "a" if self.resume else "w", encoding="utf-8") as fh:
                if self.resume and fh.tell():
                    fh.write(f"\n----- {time.strftime('%Y-%m-%d %H:%M:%S')}: run again with "
                             "--resume -----\n")
                st.offset = fh.tell()
                fh.flush()
                st.proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, env=env,
                                           start_new_session=True,
                                           preexec_fn=end_with_launcher())
        except OSError as exc:
            self._release(st)
            st.state, st.code, st.end = FAILED, 127, time.time()
            st.note = f"could not start: {exc.strerror or exc}"
            self._say(f"{job.name}: {st.note}")
            return
        if self.stopping is not None:  # a signal came while it started
            killpg(st.proc.pid, self.stopping)
        where = f"GPUs {','.join(st.gpus)}" if self.free is not None else (
            f"{threads} CPU thread{'s' if threads > 1 else ''}" if threads else "the CPU")
        port = f", port {st.port}" if st.port else ""
        self._say(f"{job.name}: started on {where}{port}; log {job.log}")
        self._write_record()

    def _ended(self, job: Job, code: int) -> None:
        st = self.status[job.name]
        st.code = 128 - code if code < 0 else code
        st.end = time.time()
        self._release(st)
        if st.code == 0:
            st.state = DONE
            st.outputs = _mtimes(job.outputs)
        else:
            st.state = STOPPED if self.stopping is not None else FAILED
        took = hms(st.end - (st.start or st.end))
        what = {DONE: "done", STOPPED: f"stopped (exit code {st.code})",
                FAILED: f"FAILED (exit code {st.code})"}[st.state]
        self._say(f"{job.name}: {what} after {took}")
        self._write_record()

    def _release(self, st: Status) -> None:
        if self.free is not None:
            self.free = sorted(self.free + st.gpus, key=_gpu_order)
        if st.port:
            self.ports.discard(st.port)

    def _new_port(self) -> int:
        from launch.machine import free_port

        for _ in range(100):
            port = free_port()
            if port not in self.ports:
                self.ports.add(port)
                return port
        raise RuntimeError("no free TCP port found")  # pragma: no cover

    # ---------------------------------------------------------------- signals

    def _on_signal(self, signum: int, _frame) -> None:
        """Pass the signal on to every running job (each stops as one run stops: its launcher
        or its ranks save and exit); start nothing more."""
        self.stopping = signum
        self.interrupts += signum == signal.SIGINT
        if self.deadline is None:
            self.deadline = time.monotonic() + STOP_WAIT_S
        self._signal_all(signum)

    def _signal_all(self, signum: int) -> None:
        for job in self.jobs:
            st = self.status[job.name]
            if st.state == RUNNING and st.proc is not None:
                killpg(st.proc.pid, signum)

    # ---------------------------------------------------------------- progress

    def _read_progress(self) -> None:
        """Take in what each running job's log says; one line per epoch without a terminal."""
        for job in self.jobs:
            st = self.status[job.name]
            if st.state != RUNNING:
                continue
            for line in read_lines(job.log, st):
                if read_progress(st, line) and not self.live:
                    self._say(f"{job.name}: {st.stage or 'training'}: epoch {st.epoch}, test "
                              f"acc {st.acc:.2f}%, ETA {eta(job, st)}")

    def table(self) -> Table:
        """The live table: a row per job."""
        table = Table(title="jobs", title_justify="left")
        for col in ("job", "state", "GPUs" if self.free is not None else "threads", "stage",
                    "epoch", "test acc", "time", "ETA"):
            table.add_column(col, justify="right" if col in ("epoch", "test acc", "time",
                                                             "ETA") else "left")
        now = time.time()
        for job in self.jobs:
            st = self.status[job.name]
            where = ",".join(st.gpus) if self.free is not None else (
                str(job.threads or self.threads or "") if st.state == RUNNING else "")
            took = hms((st.end or now) - st.start) if st.start else ""
            state = st.state + (f" ({st.note})" if st.note else "")
            color = {DONE: "green", REUSED: "green", FAILED: "red", RUNNING: "cyan"}.get(
                st.state, "")
            table.add_row(escape(job.name), f"[{color}]{escape(state)}[/]" if color else state,
                          where, escape(st.stage), st.epoch,
                          "" if st.acc is None else f"{st.acc:.2f}%", took,
                          eta(job, st))
        return table

    def _say(self, text: str) -> None:
        with self._lock:
            console = self._live.console if self._live is not None else self.console
            console.print(escape(text))

    # ---------------------------------------------------------------- record, resume

    def _write_record(self) -> None:
        jobs = []
        for job in self.jobs:
            st = self.status[job.name]
            jobs.append({"name": job.name, "state": st.state, "code": st.code,
                         "start": st.start, "end": st.end, "gpus": st.gpus, "port": st.port,
                         "threads": job.threads or self.threads, "log": str(job.log),
                         "note": st.note, "argv": _comparable(job.argv), "outputs": st.outputs})
        try:
            atomic_write_text(self.logs / RECORD, json.dumps({"jobs": jobs}, indent=1) + "\n")
        except OSError:  # the record only helps --resume; the jobs' files are what count
            pass

    def _reuse_finished(self) -> None:
        """--resume: a job that finished with the same command, whose files are unchanged
        since and whose inputs were not remade, is not run again."""
        try:
            before = {j["name"]: j for j in json.loads((self.logs / RECORD).read_text())["jobs"]}
        except (OSError, ValueError, KeyError, TypeError):
            return
        for job in self.jobs:
            old = before.get(job.name) or {}
            if (old.get("state") in ENDED_OK and old.get("argv") == _comparable(job.argv)
                    and old.get("outputs") and old["outputs"] == _mtimes(job.outputs)
                    and all(self.status[d].state == REUSED for d in job.deps)):
                st = self.status[job.name]
                st.state, st.outputs = REUSED, old["outputs"]
                st.start, st.end, st.code = old.get("start"), old.get("end"), 0
                self._say(f"{job.name}: done earlier, its files unchanged; not run again")

    # ---------------------------------------------------------------- the end

    def _summary(self) -> int:
        """Print how the jobs ended; the study's exit code."""
        if self.live:
            self.console.print(self.table())
        else:  # the table's content in one line: each job was said as it started and ended
            self._say("jobs: " + ", ".join(f"{j.name} {self.status[j.name].state}"
                                           for j in self.jobs))
        failed = [j for j in self.jobs if self.status[j.name].state == FAILED]
        for job in failed:
            st = self.status[job.name]
            print(f"error: job {job.name} failed ({st.note or f'exit code {st.code}'}); the last "
                  f"lines of its log {job.log}:", file=sys.stderr)
            for line in tail(job.log, TAIL_LINES):
                print(f"    {line}", file=sys.stderr)
        if self.stopping is not None:
            stopped = [j.name for j in self.jobs if self.status[j.name].state == STOPPED]
            waiting = [j.name for j in self.jobs if self.status[j.name].state == NOT_STARTED]
            parts = ([f"{', '.join(stopped)} stopped"] if stopped else []) + (
                [f"{', '.join(waiting)} not started"] if waiting else [])
            print(f"stopped by {signal.Signals(self.stopping).name}"
                  f"{': ' + '; '.join(parts) if parts else ''}; continue with the same command "
                  "plus --resume", file=sys.stderr)
            return 128 + self.stopping
        if failed:
            ok = [j.name for j in self.jobs if self.status[j.name].state in ENDED_OK]
            print(f"error: {len(failed)} of {len(self.jobs)} jobs failed "
                  f"({', '.join(j.name for j in failed)})"
                  + (f"; {', '.join(ok)} finished and kept their files" if ok else "")
                  + "; fix the cause and run the same command plus --resume", file=sys.stderr)
            return 1  # the study failed (a job's own code, e.g. 2 for its bad input, is above)
        return 0


def _comparable(argv: list[str]) -> list[str]:
    """A job's command as --resume compares it (with or without --resume is the same job)."""
    return [a for a in argv if a not in ("--resume", "--no-resume")]


def _mtimes(paths: Iterable[Path]) -> dict[str, int]:
    """{path: mtime_ns} of the files that exist."""
    out = {}
    for p in paths:
        try:
            out[str(p)] = os.stat(p).st_mtime_ns
        except OSError:
            continue
    return out


def _gpu_order(gpu: str) -> tuple[int, str]:
    return (int(gpu), "") if gpu.isdigit() else (1 << 30, gpu)

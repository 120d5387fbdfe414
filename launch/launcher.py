"""Start a run: in this process when it needs one process, else as an ``accelerate launch`` job.

``dispatch(cfg)`` is what ``python -m launch <command>`` calls. A job of several processes
(DDP, DataParallel over several GPUs, several machines, or ``--gpu-ids`` other than 0) is
started as ``python -m accelerate.commands.launch --config_file X -m trainer <command> ...``
with a generated (or the user's) Accelerate config. A rank that fails or stops on a signal says
so in ``rank<R>.txt`` in the folder named by env ``SLIMTUNE_FAILURE_DIR``
(``trainer.dist.report_to_launcher``): first line the one-line message, optionally a line
``exit_code=N``; the launcher prints those as its last lines, the root cause last.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from launch.accelerate_config import (
    MIXED_PRECISIONS,
    build_accelerate_config,
    build_launch_argv,
    dump_yaml,
    launch_env,
    parse_gpu_ids,
    process_count,
    worker_argv,
    write_config,
)
from trainer.config import RunConfig
from trainer.dist import FAILURE_DIR_ENV, is_consequence, is_stop
from trainer.errors import ConfigError, UserError

STOP_WAIT_S = 120.0  # how long to wait for workers to save and exit after a forwarded signal


@dataclass
class LaunchPlan:
    """What dispatch does: run ``cfg`` in this process (``config`` None) or launch ``argv``."""

    cfg: RunConfig
    config: dict | None = None
    config_path: Path | None = None
    write: bool = False  # True when dispatch generates ``config_path``
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    note: str | None = None

    @property
    def in_process(self) -> bool:
        return self.config is None


def dispatch(cfg: RunConfig) -> int:
    """Run ``cfg`` in this process or as an ``accelerate launch`` job; return the exit code."""
    from trainer.runner import validate

    validate(cfg)  # refuse bad settings before any process starts or file is written
    plan = plan_launch(cfg)
    if plan.note:
        print(plan.note, file=sys.stderr)
    if cfg.dry_run:
        print(describe(plan))
        return 0
    if plan.in_process:
        from trainer.runner import run_worker  # lazy: the launcher must start fast

        return run_worker(plan.cfg)
    from trainer.runner import preflight

    preflight(plan.cfg)  # bad input: one line here, not one per rank after torchrun's report
    if plan.write:
        try:
            write_config(plan.config, plan.config_path)
        except OSError as exc:
            raise ConfigError(f"cannot write the Accelerate config {plan.config_path} "
                              f"({exc.strerror or exc}); pick a writable --output/--workdir "
                              "folder or pass --accelerate-config FILE") from None
    argv = plan.argv
    if needs_own_port(plan.config):
        argv = with_port(argv, free_port())
    return run_job(argv, os.environ | plan.env, ranks=local_ranks(plan.config))


def needs_own_port(config: dict) -> bool:
    """True for a one-machine DDP job whose config names no rendezvous port.

    Accelerate's default port, 29500, is probed and only later bound by torchrun: two jobs
    started together on one machine both took it and one failed with EADDRINUSE (seen in CI),
    as does any job while a socket sits on 29500 without listening. A port the kernel has just
    handed out is free, and a launcher started beside this one gets another.
    """
    return (process_count(config) > 1 and int(config.get("num_machines", 1)) <= 1
            and not config.get("main_process_port"))


def with_port(argv: list[str], port: int) -> list[str]:
    """``argv`` (an ``accelerate launch`` command) with ``--main_process_port port``."""
    at = argv.index("--config_file") + 2
    return [*argv[:at], "--main_process_port", str(port), *argv[at:]]


def free_port() -> int:
    """A TCP port no socket on this machine is bound to right now."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def plan_launch(cfg: RunConfig, visible_gpus: int | None = None,
                environ: dict[str, str] | None = None) -> LaunchPlan:
    """Decide how ``cfg`` runs; ``visible_gpus``/``environ`` default to this machine's."""
    environ = os.environ if environ is None else environ
    if cfg.debug:
        return LaunchPlan(cfg)
    if cfg.accelerate_config:
        return _user_config_plan(cfg, visible_gpus, environ.get("CUDA_VISIBLE_DEVICES"))
    ids = parse_gpu_ids(cfg.gpu_ids)
    gpus = cfg.gpus if cfg.gpus is not None else (len(ids) if ids else None)
    visible = 0
    if not cfg.cpu:
        visible = _visible_gpus() if visible_gpus is None else visible_gpus
        if gpus is None and visible == 0 and cfg.num_machines == 1:
            return LaunchPlan(cfg.replace(cpu=True), note="note: no CUDA GPU is visible; running "
                              "on the CPU in this process (add --cpu to silence this note)")
        if gpus is None and visible == 0:
            raise ConfigError("no CUDA GPU is visible on this machine; add --cpu to run on "
                              "the CPU")
        gpus = visible if gpus is None else gpus
    config = build_accelerate_config(
        gpus=gpus if gpus is not None else 1, mode=cfg.mode, gpu_ids=ids,
        mixed_precision=cfg.mixed_precision, cpu=cfg.cpu, num_machines=cfg.num_machines,
        machine_rank=cfg.machine_rank, main_process_ip=cfg.main_process_ip,
        main_process_port=cfg.main_process_port)
    if not cfg.cpu and not cfg.dry_run:  # --dry-run previews a layout for any machine
        _check_machine(gpus, ids, visible)
    if process_count(config) == 1 and config.get("gpu_ids", "all") in ("all", "0"):
        return LaunchPlan(cfg)
    _check_batch(cfg.batch_size, config)
    if cfg.command == "pipeline":
        _check_batch(cfg.finetune_batch_size, config, "--finetune-batch-size")
    if "gpu_ids" in config and config["gpu_ids"] != "all":
        config["gpu_ids"] = through_visible_devices(config["gpu_ids"],
                                                    environ.get("CUDA_VISIBLE_DEVICES"))
    return _subprocess_plan(cfg, config, default_config_path(cfg, config), write=True)


def _user_config_plan(cfg: RunConfig, visible_gpus: int | None = None,
                      visible_env: str | None = None) -> LaunchPlan:
    if cfg.gpus is not None or cfg.gpu_ids is not None:
        raise ConfigError("--accelerate-config already fixes the processes and GPUs; drop "
                          "--gpus/--gpu-ids, or drop --accelerate-config to generate one")
    path = Path(cfg.accelerate_config)
    config = load_user_config(path)
    if not cfg.cpu and config.get("use_cpu") is not True and not cfg.dry_run:
        visible = _visible_gpus() if visible_gpus is None else visible_gpus
        _check_user_machine(config, path, visible, visible_env)
    cfg = cfg.replace(**settings_from_config(config))
    _check_batch(cfg.batch_size, config)
    if cfg.command == "pipeline":
        _check_batch(cfg.finetune_batch_size, config, "--finetune-batch-size")
    return _subprocess_plan(cfg, config, path, write=False)


def _subprocess_plan(cfg: RunConfig, config: dict, path: Path, write: bool) -> LaunchPlan:
    _require_accelerate()
    args = worker_argv(cfg, *_worker_interface(cfg.command))
    return LaunchPlan(cfg, config=config, config_path=path, write=write,
                      argv=build_launch_argv(path, args[0], args[1:]),
                      env=launch_env(config, cfg.cpu))


@functools.cache
def _worker_interface(command: str) -> tuple[frozenset[str] | None, tuple[str, ...]]:
    """(options, positional arguments) that ``python -m trainer <command>`` accepts.

    Read from the worker's own click command, so the argv never carries an option the command
    does not declare (e.g. ``--epochs`` for evaluate). Unknown command: every worker field.
    """
    import typer

    from trainer.cli import build_app

    group = typer.main.get_command(build_app(lambda _cfg: 0))
    command_obj = getattr(group, "commands", {}).get(command)
    if command_obj is None:
        return None, ()
    # param_type_name, not isinstance: typer >= 0.26 ships its own copy of click.
    params = command_obj.params
    options = frozenset(p.name for p in params if p.param_type_name == "option")
    positional = tuple(p.name for p in params if p.param_type_name == "argument")
    return options, positional


def default_config_path(cfg: RunConfig, config: dict) -> Path:
    """Where a generated config goes: next to the run's outputs.

    Folder: that of the run's best checkpoint (``--output`` or the command's default, e.g.
    beside ``--checkpoint`` for finetune), or ``<workdir>/checkpoints`` for pipeline and
    evaluate. Name: ``accelerate_<kind>_<N><unit>[_node<R>].yaml`` with kind ddp, cpu_ddp,
    dp or single; N = processes (``proc``) or, for dp, GPUs (``gpu``); ``_node<R>`` on several
    machines (their files may share a network folder).
    """
    from trainer.runner import output_path

    out = output_path(cfg)
    if cfg.command == "pipeline" or out is None:
        folder = Path(cfg.workdir) / "checkpoints"
    else:
        folder = out.parent
    n = process_count(config)
    if n > 1:
        kind = "cpu_ddp" if config.get("use_cpu") else "ddp"
        name = f"accelerate_{kind}_{n}proc"
    elif "," in str(config.get("gpu_ids", "")):
        name = f"accelerate_dp_{len(str(config['gpu_ids']).split(','))}gpu"
    else:
        name = "accelerate_single_1proc"
    if int(config.get("num_machines", 1)) > 1:
        name += f"_node{config.get('machine_rank', 0)}"
    return folder / f"{name}.yaml"


def settings_from_config(config: dict) -> dict[str, str]:
    """What a user's Accelerate config decides for the worker, over the CLI defaults:
    DataParallel (one process, ``distributed_type: 'NO'``, several ``gpu_ids``) and the mixed
    precision (an unquoted ``no`` in YAML reads as False)."""
    ids = str(config.get("gpu_ids") or "all")
    dp = str(config.get("distributed_type")) == "NO" and "," in ids
    precision = config.get("mixed_precision", "no")
    return {"mode": "dp" if dp else "ddp",
            "mixed_precision": "no" if precision in (False, None) else str(precision).lower()}


def load_user_config(path: Path) -> dict:
    """Read a user's Accelerate config (YAML or JSON); ConfigError on anything unusable."""
    fix = "fix it or write one with: python -m launch config --gpus N"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"cannot read --accelerate-config {path}: {reason}; {fix}") from None
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"--accelerate-config {path} is not valid YAML{where}; {fix}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"--accelerate-config {path} is not a mapping of settings; {fix}")
    if "distributed_type" not in config:
        raise ConfigError(f"--accelerate-config {path} has no distributed_type; {fix}")
    where = f"--accelerate-config {path}:"
    _check_user_kind(config["distributed_type"], where)
    multi = config["distributed_type"] == "MULTI_GPU"
    if multi and _user_int(config, "num_processes", -1, 1) is None:
        raise ConfigError(f"--accelerate-config {path} needs num_processes >= 1 for "
                          f"distributed_type {config['distributed_type']}; {fix}")
    _check_user_machines(config, where)
    _check_user_values(config, where)
    return config


# distributed_type values the worker supports. Accelerate turns others into a traceback
# (unknown names), a job the worker cannot save from (DEEPSPEED, FSDP, ...) or, for
# MULTI_CPU, ONE process whatever num_processes says.
USER_DISTRIBUTED_TYPES = ("NO", "MULTI_GPU")


def _check_user_kind(kind, where: str) -> None:
    if kind is False:  # YAML 1.1 reads an unquoted NO as false; Accelerate then crashes
        raise ConfigError(f"{where} distributed_type: NO reads as false in YAML; quote it: "
                          "distributed_type: 'NO'")
    if kind not in USER_DISTRIBUTED_TYPES:
        raise ConfigError(f"{where} distributed_type {kind!r} is not supported; use 'NO' (one "
                          "process, or DataParallel over several gpu_ids) or MULTI_GPU (DDP; "
                          "add use_cpu: true for CPU processes)")


def _user_int(config: dict, key: str, default: int, low: int,
              high: int | None = None) -> int | None:
    """``config[key]`` as an int in [low, high]; None if it is not one (bools are not)."""
    value = config.get(key, default)
    ok = (isinstance(value, int) and not isinstance(value, bool) and value >= low
          and (high is None or value <= high))
    return value if ok else None


def _check_user_machines(config: dict, where: str) -> None:
    """num_machines, machine_rank, their split of num_processes, the main machine's address."""
    machines = _user_int(config, "num_machines", 1, 1)
    if machines is None:
        raise ConfigError(f"{where} num_machines {config['num_machines']!r} is not allowed; "
                          "use a whole number >= 1 (1 for one machine)")
    if _user_int(config, "machine_rank", 0, 0, machines - 1) is None:
        raise ConfigError(f"{where} machine_rank {config['machine_rank']!r} is not allowed for "
                          f"num_machines {machines}; use 0 .. {machines - 1} (0 = main)")
    total = process_count(config)
    if config["distributed_type"] == "MULTI_GPU" and total % machines:
        raise ConfigError(f"{where} num_processes {total} does not split evenly over "
                          f"num_machines {machines}; use a multiple of {machines} (the total "
                          "over all machines)")
    if machines > 1 and not config.get("main_process_ip"):
        raise ConfigError(f"{where} num_machines {machines} needs main_process_ip; add the "
                          "address of the machine_rank 0 machine")
    port = config.get("main_process_port")
    if port is not None and _user_int(config, "main_process_port", 0, 1, 65535) is None:
        raise ConfigError(f"{where} main_process_port {port!r} is not a TCP port; use a free "
                          "port in 1..65535 (e.g. 29500) or leave it out")


def _check_user_values(config: dict, where: str) -> None:
    """mixed_precision, use_cpu and gpu_ids: what settings_from_config, launch_env and
    Accelerate read."""
    precision = config.get("mixed_precision")
    if precision not in (None, False) and precision not in MIXED_PRECISIONS:
        raise ConfigError(f"{where} mixed_precision {precision!r} is not supported; use "
                          f"{', '.join(repr(p) for p in MIXED_PRECISIONS)} (quote 'no')")
    if not isinstance(config.get("use_cpu", False), bool):
        raise ConfigError(f"{where} use_cpu {config['use_cpu']!r} is not allowed; use true "
                          "(CPU processes) or false (GPUs)")
    ids = user_gpu_ids(config, where)
    local = process_count(config) // _user_int(config, "num_machines", 1, 1)
    if ids and config["distributed_type"] == "MULTI_GPU" and len(ids) != local:
        raise ConfigError(f"{where} gpu_ids {_ids_text(ids)} lists {len(ids)} GPUs for "
                          f"{local} processes per machine; list one GPU per process or write "
                          "gpu_ids: all")


def user_gpu_ids(config: dict, where: str) -> list[int] | None:
    """The GPU numbers a user's config names; None for ``all`` or none."""
    value = config.get("gpu_ids")
    if value is None or str(value).strip().lower() in ("", "all"):
        return None
    parts = [p.strip() for p in str(value).split(",")]
    if isinstance(value, bool) or not all(p.isdigit() for p in parts):
        raise ConfigError(f"{where} gpu_ids {value!r} is not a list of GPU numbers; write "
                          "them comma-separated (gpu_ids: 0,1) or write gpu_ids: all")
    ids = [int(p) for p in parts]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{where} gpu_ids {value!r} names a GPU twice; list each GPU once")
    return ids


def _ids_text(ids: list[int]) -> str:
    return ",".join(map(str, ids))


def _check_user_machine(config: dict, path: Path, visible: int,
                        visible_env: str | None = None) -> None:
    """What _check_machine refuses for --gpus/--gpu-ids, for the GPUs a user's config asks of
    this machine: without it a GPU config on a GPU-less machine quietly ran ONE CPU process.

    A config's gpu_ids become CUDA_VISIBLE_DEVICES as they are (physical numbers), so under
    a narrowed CUDA_VISIBLE_DEVICES they must be among its entries, else below ``visible``."""
    where = f"--accelerate-config {path}"
    ids = user_gpu_ids(config, where + ":")
    machines = _user_int(config, "num_machines", 1, 1)
    local = (process_count(config) // machines if config["distributed_type"] == "MULTI_GPU"
             else len(ids or [0]))
    if visible == 0:
        raise ConfigError(f"{where} asks for {local} GPU{'s' if local > 1 else ''} but no CUDA "
                          "GPU is visible on this machine; add --cpu to run on the CPU")
    allowed = [v.strip() for v in (visible_env or "").split(",") if v.strip()]
    if ids and allowed and not {str(i) for i in ids} <= set(allowed):
        raise ConfigError(f"{where} uses gpu_ids {_ids_text(ids)} but CUDA_VISIBLE_DEVICES="
                          f"{','.join(allowed)}; list GPUs from it, or gpu_ids: all")
    if ids and not allowed and max(ids) >= visible:
        raise ConfigError(f"{where} uses gpu_ids {_ids_text(ids)} but only {visible} GPUs are "
                          f"visible (ids 0..{visible - 1}); pick ids below {visible}")
    if local > visible:
        raise ConfigError(f"{where} starts {local} GPU processes on this machine but only "
                          f"{visible} GPUs are visible; use a config for {visible} or fewer "
                          f"(python -m launch config --gpus {visible})")


def through_visible_devices(gpu_ids: str, visible_env: str | None) -> str:
    """Map GPU numbers as this process sees them to CUDA_VISIBLE_DEVICES entries.

    Accelerate overwrites CUDA_VISIBLE_DEVICES with ``gpu_ids``; when the user had already
    narrowed it (e.g. ``CUDA_VISIBLE_DEVICES=2,3``), ``--gpu-ids 0`` must stay physical GPU 2.
    """
    if not visible_env or not visible_env.strip():
        return gpu_ids
    visible = [v.strip() for v in visible_env.split(",") if v.strip()]
    ids = [int(i) for i in gpu_ids.split(",")]
    if max(ids) >= len(visible):
        return gpu_ids
    return ",".join(visible[i] for i in ids)


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _check_machine(gpus: int, ids: list[int] | None, visible: int) -> None:
    if visible == 0:
        raise ConfigError(f"--gpus {gpus} but no CUDA GPU is visible on this machine; "
                          "add --cpu to run on the CPU")
    if ids and max(ids) >= visible:
        raise ConfigError(f"--gpu-ids {','.join(map(str, ids))} but only {visible} GPUs are "
                          f"visible (ids 0..{visible - 1}); pick ids below {visible}")
    if gpus > visible:
        raise ConfigError(f"--gpus {gpus} but only {visible} GPUs are visible; "
                          f"use --gpus {visible} or fewer")


def _check_batch(batch_size: int, config: dict, flag: str = "--batch-size") -> None:
    """DDP splits the global batch evenly: each process gets batch_size / processes images."""
    n = process_count(config)
    if n > 1 and batch_size % n:
        nearest = max(n, round(batch_size / n) * n)
        raise ConfigError(f"{flag} {batch_size} does not split evenly over {n} processes; "
                          f"use a multiple of {n} (e.g. {flag} {nearest})")


def _require_accelerate() -> None:
    try:
        spec = importlib.util.find_spec("accelerate")
    except (ImportError, ValueError):
        spec = None
    roots = spec.submodule_search_locations if spec is not None else None
    if not roots or not any((Path(r) / "commands" / "launch.py").is_file() for r in roots):
        raise ConfigError("accelerate is not installed in this environment; "
                          "pip install accelerate")


def describe(plan: LaunchPlan) -> str:
    """The dry-run text: the exact command (and env), and the Accelerate config YAML."""
    if plan.in_process:
        argv = [sys.executable, "-m", "trainer",
                *worker_argv(plan.cfg, *_worker_interface(plan.cfg.command))]
        return f"# runs in this process (one process, no accelerate launch):\n{shlex.join(argv)}"
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(plan.env.items()))
    command = f"{env} {shlex.join(plan.argv)}" if env else shlex.join(plan.argv)
    if needs_own_port(plan.config):
        command += ("\n# the launch adds --main_process_port <a free port> after --config_file "
                    "(Accelerate's default, 29500, would be shared by every job on this machine)")
    state = "would be written to" if plan.write else "read from"
    return (f"{command}\n# accelerate config ({state} {plan.config_path}):\n"
            f"{dump_yaml(plan.config)}")


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

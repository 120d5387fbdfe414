"""Every check of a run's settings, once: the launcher, the worker, prune and bench call these.

Pure Python (no torch): the launcher refuses bad settings before anything starts or is
written, and ``--dry-run`` stays fast. Each failure names the problem and the fix (one line,
exit code 2): a ParamError names the parameter, which the command line says as its flag.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer.config.archs import get_arch
from trainer.config.derived import INHERITED
from trainer.config.paths import fmt_count, input_checkpoint, ratio_tag, written_files
from trainer.config.settings import (
    ALLOCATIONS,
    AUGMENTS,
    BUDGET_KINDS,
    CRITERIA,
    DATASETS,
    LOADERS,
    MIXED_PRECISIONS,
    MODES,
    OPTIMIZERS,
    RUN_COMMANDS,
    SCOPES,
    SCRATCH,
    RunConfig,
)
from trainer.config.study import check_job
from trainer.errors import ConfigError, ParamError, shown


def _finite(v: float) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _one_of(choices: tuple[str, ...]) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in choices), f": use {', '.join(choices[:-1])} or {choices[-1]}"


# parameter -> (what a valid value satisfies, what the message says after the value); the
# one statement of each rule, for the command line (validate) and the library alike (check).
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "epochs": (lambda v: v >= 1, ": need at least 1 epoch"),
    "lr": (lambda v: _finite(v) and v > 0, ": the learning rate must be a positive number"),
    "batch_size": (lambda v: v >= 1, ": need at least 1"),
    "finetune_batch_size": (lambda v: v >= 1, ": need at least 1"),
    "optimizer": _one_of(OPTIMIZERS),
    "mode": _one_of(MODES),
    "mixed_precision": _one_of(MIXED_PRECISIONS),
    "loader": _one_of(LOADERS),
    "augment": _one_of(AUGMENTS),
    "sparsity": (lambda v: _finite(v) and v >= 0, ": must be 0 or positive"),
    "weight_decay": (lambda v: _finite(v) and v >= 0, ": must be 0 or positive"),
    "warmup_epochs": (lambda v: _finite(v) and v >= 0, ": must be 0 or positive"),
    "gamma_init": (_finite, ": must be a number"),
    "momentum": (lambda v: _finite(v) and 0 <= v < 1, ": must be in [0, 1), e.g. 0.9"),
    "seed": (lambda v: v >= 0, ": must be 0 or more"),
    "dist_timeout": (lambda v: v >= 1, ": need at least 1 second"),
    "min_channels": (lambda v: v >= 0, ": must be 0 or more"),
    "num_workers": (lambda v: v >= 0, ": must be 0 or more"),
    "threads": (lambda v: v is None or 1 <= v <= 1024, ": use 1 or more (threads per process)"),
    "limit_batches": (lambda v: v is None or v >= 1, ": must be 1 or more"),
    "image_size": (lambda v: v >= 8, ": must be 8 or more"),
    "round_to": (lambda v: v >= 1, ": use 1 (off) or more, e.g. 8"),
    "passes": (lambda v: v >= 1, ": need at least 1"),
    "kd_alpha": (lambda v: _finite(v) and 0 <= v <= 1,
                 ": must be in [0, 1] (the weight of the teacher's term)"),
    "kd_temperature": (lambda v: _finite(v) and v > 0, ": must be above 0, e.g. 4"),
    "target_kind": _one_of(BUDGET_KINDS),
    "scope": _one_of(SCOPES),
    "criterion": _one_of(CRITERIA),
    "allocation": _one_of(ALLOCATIONS),
    "taylor_batches": (lambda v: v >= 1, ": need at least 1"),
    "bn_recalibrate": (lambda v: v >= 0, ": must be 0 (off) or more batches"),
    "scratch": (lambda v: v is None or v in SCRATCH, ": use E (the same epochs) or B (epochs "
                "scaled by the MACs saved)"),
    "jobs": (lambda v: v is None or v >= 1, ": need at least 1 job at once"),
    "gpus_per_job": (lambda v: v is None or v >= 1, ": need at least 1 GPU per job"),
}
_QUOTED = {"optimizer", "mode", "mixed_precision", "loader", "augment", "target_kind", "scope",
           "criterion", "allocation", "scratch"}


def check(param: str, value: Any) -> Any:
    """``value`` if it is a valid ``param`` (RULES), else ParamError naming the parameter."""
    ok, problem = RULES[param]
    if isinstance(value, bool) or not ok(value):
        raise ParamError.value(param, value, problem, quote=param in _QUOTED,
                               cli_hint="; see --help")
    return value


def validate(run: RunConfig) -> None:
    """Refuse settings that cannot work, before anything starts or is written."""
    if run.command not in RUN_COMMANDS:
        raise ConfigError(f"unknown command {run.command!r}")
    if run.dataset is not None and run.dataset not in DATASETS:  # None: the checkpoint's
        raise ParamError.value("dataset", run.dataset, f" is unknown; use one of "
                               f"{', '.join(DATASETS)}", quote=True, cli_hint="; see --help")
    for param in RULES:
        if getattr(run, param) is not None or param not in INHERITED:
            check(param, getattr(run, param))
    if run.arch is not None:
        get_arch(run.arch)
    if run.sync_bn and run.cpu:
        raise ConfigError("--sync-bn synchronises BatchNorm over GPU processes and needs CUDA; "
                          "drop it with --cpu")
    check_dp(run)
    check_pool(run)
    _check_pruning(run)
    check_scratch(run)
    if run.command == "pipeline" and (run.train_epochs < 1 or run.finetune_epochs < 1):
        raise ConfigError("--train-epochs and --finetune-epochs need at least 1 epoch")
    check_written_files(run)


def check_dp(run: RunConfig) -> None:
    """DataParallel copies the module per GPU per step: the copies of a compiled module wipe
    its parameters, and Accelerate's autocast forward stays bound to GPU 0's model."""
    several = run.gpus is None or run.gpus > 1 or "," in (run.gpu_ids or "")  # None: all
    if (run.mode == "dp" and not run.cpu and several
            and (run.compile or run.mixed_precision != "no")):
        raise ConfigError("--mode dp runs in FP32 without --compile; use --mode ddp for "
                          "--compile or --mixed-precision bf16/fp16")


def check_pool(run: RunConfig) -> None:
    """Settings of a study run as many jobs (launch.pool) that cannot go together."""
    if run.command == "pipeline":
        check_job(run)
    pooled = [p for p in ("jobs", "gpus_per_job") if getattr(run, p) is not None]
    if run.job is not None and (pooled or run.slurm):
        raise ParamError("{job} runs one job of a study; drop " + " and ".join(
            "{" + p + "}" for p in (pooled or ["slurm"])) + " (they start every job)",
                         "job", *(pooled or ["slurm"]))
    if run.gpus_per_job is not None and run.cpu:
        raise ParamError("{gpus_per_job} splits GPUs between jobs; on the CPU give {jobs} J "
                         "(J jobs at once, the cores split between them)", "gpus_per_job",
                         "jobs")
    total = run.gpus if run.gpus is not None else (
        len(run.gpu_ids.split(",")) if run.gpu_ids else None)
    if run.gpus_per_job is not None and total is not None and run.gpus_per_job > total:
        flag = "{gpus}" if run.gpus is not None else "{gpu_ids}"
        raise ParamError("{gpus_per_job} " + f"{run.gpus_per_job} is more than the {total} "
                         f"GPUs of {flag}; a job gets at most every GPU of the study: use "
                         "{gpus_per_job} " + f"{total} or fewer", "gpus_per_job",
                         "gpus" if run.gpus is not None else "gpu_ids")
    if (pooled or run.slurm) and run.accelerate_config:
        raise ConfigError("--accelerate-config fixes the processes of one job; with --jobs, "
                          "--gpus-per-job or --slurm each job's GPUs come from --gpus-per-job")
    if pooled and not run.slurm and run.num_machines > 1:
        raise ConfigError("--jobs and --gpus-per-job run a study's jobs on this machine; for "
                          "several machines write a SLURM script with --slurm FILE")


def _check_pruning(run: RunConfig) -> None:
    if run.command == "prune":
        check_amount(run.ratio, run.target_params, run.target_macs)
    if run.command == "pipeline" and not run.targets:
        check_ratios(run.ratios)
    if run.command == "pipeline" and run.targets:
        twice = sorted({fmt_count(t) for t in run.targets if run.targets.count(t) > 1})
        if twice:
            raise ParamError("{targets} lists " + ", ".join(twice) + " twice; give each budget "
                             "once", "targets")
    if run.command == "pipeline":
        check_choices_list(run, "criteria", "criterion")
        check_choices_list(run, "allocations", "allocation")


def check_choices_list(run: RunConfig, param: str, one: str) -> None:
    """--criteria / --allocations: at least one, each a known ``one`` (its rule), none twice."""
    values = getattr(run, param)
    if not values:
        raise ParamError("{" + param + "} is empty; give at least one, e.g. {" + param + "} "
                         f"{getattr(RunConfig(), param)[0]}", param)
    for value in values:
        ok, problem = RULES[one]
        if not ok(value):
            raise ParamError.value(param, value, problem, quote=True, cli_hint="; see --help")
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:
        raise ParamError("{" + param + "} lists " + ", ".join(twice) + " twice; give each "
                         "once", param)


def check_scratch(run: RunConfig) -> None:
    """--scratch-from starts from a fresh model of the file's widths: not --init's weights, not
    with the sparsity of the run it replaces; --scratch needs it."""
    if run.command != "train":
        return
    if run.scratch is not None and not run.scratch_from:
        raise ParamError("{scratch} " + run.scratch + " needs {scratch_from} CKPT, the pruned "
                         "checkpoint whose architecture is trained from scratch",
                         "scratch", "scratch_from")
    if run.scratch_from and run.init:
        raise ParamError("{init} and {scratch_from} both say where the model starts; give one",
                         "init", "scratch_from")
    if run.scratch_from and run.sparsity > 0:
        raise ParamError("{scratch_from} trains without sparsity (the baseline of Liu et al. "
                         "2019); drop {sparsity}", "scratch_from", "sparsity")


def check_amount(ratio: float | None, target_params: int | None,
                 target_macs: int | None) -> None:
    """Exactly one of a ratio and a params or MACs budget says how much to prune."""
    given = [p for p, v in (("ratio", ratio), ("target_params", target_params),
                            ("target_macs", target_macs)) if v is not None]
    if not given:
        raise ParamError("prune needs {ratio} R with 0 < R < 1 (the fraction of channels to "
                         "remove), e.g. {ratio} 0.5, or a budget: {target_params} 4M or "
                         "{target_macs} 100M", "ratio", "target_params", "target_macs")
    if len(given) > 1:
        raise ParamError(" and ".join("{" + p + "}" for p in given) + " both say how much to "
                         "prune; give one", *given)
    if ratio is not None:
        check_ratio(ratio)


def check_ratio(ratio: float) -> float:
    """A prune ratio is the fraction of channels removed: strictly between 0 and 1."""
    if isinstance(ratio, bool) or not _finite(ratio) or not 0 < ratio < 1:
        raise ParamError.value("ratio", ratio, " is outside (0, 1); give the fraction of "
                               "channels to prune, e.g. 0.5")
    return ratio


def check_ratios(ratios: tuple[float, ...]) -> None:
    """At least one ratio, each valid, and no two that would write the same files."""
    if not ratios:
        raise ParamError("{ratios} is empty; give the prune ratios to study, e.g. "
                         "{ratios} 0.5,0.9", "ratios")
    for r in ratios:
        check_ratio(r)
    tags = [ratio_tag(r) for r in ratios]
    twice = sorted({t for t in tags if tags.count(t) > 1})
    if twice:
        listed = ", ".join(f"{float(t) / 100:g}" for t in twice)
        raise ParamError("{ratios} lists " + listed + " twice; give each ratio once", "ratios")


def parse_count(text: str | int | float, param: str) -> int:
    """A count of params or MACs: 4000000, 4e6, 4M, 2.5M or 1.2G (K, M, G: 10^3, 10^6, 10^9)."""
    raw = str(text).strip()
    scale = {"K": 1e3, "M": 1e6, "G": 1e9}.get(raw[-1:].upper(), 1)
    try:
        value = float(raw[:-1] if scale != 1 else raw) * scale
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 1:
        raise ParamError.value(param, raw, " is not a positive count; write e.g. 4M, 4e6 or "
                               "4000000 (K, M, G suffixes)", quote=True)
    return int(round(value))


def check_batch_split(batch_size: int, processes: int, param: str = "batch_size") -> int:
    """DDP splits the global batch evenly; returns the per-process batch."""
    if processes > 1 and batch_size % processes:
        nearest = max(processes, round(batch_size / processes) * processes)
        raise ParamError.value(param, batch_size, f" does not split evenly over {processes} "
                               f"processes; use a multiple of {processes} (e.g. {{{param}}} "
                               f"{nearest})")
    return batch_size // processes


def check_written_files(run: RunConfig) -> None:
    """No run writes over its input, onto a folder or a special file, or to a name the file
    system cannot hold (found before any work, not after it)."""
    sources = [(s, w) for s, w in ((input_checkpoint(run), "the input checkpoint"),
                                   (run.teacher, "the --teacher checkpoint")) if s]
    for what, path in written_files(run):
        check_path_length(what, path)
        for src, name in sources:
            if _same_path(path, Path(src)):
                raise ConfigError(f"{what} {path} is {name}; choose another path (slimtune "
                                  "never overwrites its source)")
        check_output_path(what, path)


def check_output_path(what: str, path: Path) -> None:
    """``path`` may be written: not a folder, not a device, FIFO or socket (an existing path
    that is not a regular file, nor a link to one)."""
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder; give a file path")
    kind = special_kind(path)
    if kind is not None:
        raise ConfigError(f"{what} {path} is a {kind}, not a regular file; slimtune never "
                          "writes over one: choose another path")


_SPECIAL = ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
            (stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISSOCK, "socket"))


def special_kind(path: Path) -> str | None:
    """What an existing ``path`` is when it is neither a regular file nor a folder (a link:
    what it points to), e.g. 'character device'; None otherwise (or when it is missing)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    return next((name for test, name in _SPECIAL if test(mode)), None)


NAME_MAX, PATH_MAX = 255, 4096  # Linux's limits (bytes), where the file system says none


def check_path_length(what: str, path: Path) -> None:
    """A name the file system can hold (else every later step fails with 'File name too
    long')."""
    name_max = _name_max(path)
    for part in Path(path).parts:
        size = len(os.fsencode(part))
        if size > name_max:
            raise ConfigError(f"{what} {shown(str(path))} has a name of {size} bytes; this file "
                              f"system allows {name_max}: choose a shorter name")
    size = len(os.fsencode(os.path.abspath(path)))
    if size >= PATH_MAX:
        raise ConfigError(f"{what} {shown(str(path))} is a path of {size:,} bytes; Linux allows "
                          f"{PATH_MAX - 1}: choose a shorter one")


def _name_max(path: Path) -> int:
    here = Path(os.path.abspath(path))
    while not os.path.exists(here) and here != here.parent:
        here = here.parent
    try:
        return os.pathconf(here, "PC_NAME_MAX")
    except (OSError, ValueError):
        return NAME_MAX


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):  # too long, a link loop: then they are not one file
        return False

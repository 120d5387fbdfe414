"""Every check of a run's settings, once: the launcher, the worker, prune and bench call these.

Pure Python (no torch): the launcher refuses bad settings before anything starts or is
written, and ``--dry-run`` stays fast. Each failure is a ConfigError naming the problem and
the fix (one line, exit code 2).
"""

from __future__ import annotations

import math
from pathlib import Path

from trainer.archs import get_arch
from trainer.config import (
    BUDGET_KINDS,
    DATASETS,
    LOADERS,
    MIXED_PRECISIONS,
    MODES,
    OPTIMIZERS,
    RUN_COMMANDS,
    SCOPES,
    RunConfig,
)
from trainer.errors import ConfigError
from trainer.paths import fmt_count, input_checkpoint, ratio_tag, written_files


def _one_of(flag: str, value: object, choices: tuple[str, ...]) -> tuple[bool, str]:
    return value in choices, f"{flag} {value!r}: use {', '.join(choices[:-1])} or {choices[-1]}"


def validate(cfg: RunConfig) -> None:
    """Refuse settings that cannot work, before anything starts or is written."""
    checks = [
        (cfg.command in RUN_COMMANDS, f"unknown command {cfg.command!r}"),
        (cfg.dataset in DATASETS, (f"--dataset {cfg.dataset!r} is unknown; use one of "
                                  f"{', '.join(DATASETS)}")),
        (cfg.epochs >= 1, f"--epochs {cfg.epochs}: need at least 1 epoch"),
        (math.isfinite(cfg.lr) and cfg.lr > 0,
         f"--lr {cfg.lr}: the learning rate must be a positive number"),
        (cfg.batch_size >= 1, f"--batch-size {cfg.batch_size}: need at least 1"),
        (cfg.finetune_batch_size >= 1,
         f"--finetune-batch-size {cfg.finetune_batch_size}: need at least 1"),
        _one_of("--optimizer", cfg.optimizer, OPTIMIZERS),
        _one_of("--mode", cfg.mode, MODES),
        _one_of("--mixed-precision", cfg.mixed_precision, MIXED_PRECISIONS),
        _one_of("--loader", cfg.loader, LOADERS),
        _non_negative("--sparsity", cfg.sparsity),
        _non_negative("--weight-decay", cfg.weight_decay),
        _non_negative("--warmup-epochs", cfg.warmup_epochs),
        (math.isfinite(cfg.gamma_init), f"--gamma-init {cfg.gamma_init}: must be a number"),
        (math.isfinite(cfg.momentum) and 0 <= cfg.momentum < 1,
         f"--momentum {cfg.momentum}: must be in [0, 1), e.g. 0.9"),
        (cfg.seed >= 0, f"--seed {cfg.seed}: must be 0 or more"),
        (cfg.dist_timeout >= 1, f"--dist-timeout {cfg.dist_timeout}: need at least 1 second"),
        (cfg.min_channels >= 0, f"--min-channels {cfg.min_channels}: must be 0 or more"),
        (cfg.num_workers >= 0, f"--num-workers {cfg.num_workers}: must be 0 or more"),
        (cfg.limit_batches is None or cfg.limit_batches >= 1,
         f"--limit-batches {cfg.limit_batches}: must be 1 or more"),
        (cfg.image_size >= 8, f"--image-size {cfg.image_size}: must be 8 or more"),
        (cfg.round_to >= 1, f"--round-to {cfg.round_to}: use 1 (off) or more, e.g. 8"),
        (cfg.passes >= 1, f"--passes {cfg.passes}: need at least 1"),
        (math.isfinite(cfg.kd_alpha) and 0 <= cfg.kd_alpha <= 1,
         f"--kd-alpha {cfg.kd_alpha}: must be in [0, 1] (the weight of the teacher's term)"),
        (math.isfinite(cfg.kd_temperature) and cfg.kd_temperature > 0,
         f"--kd-temperature {cfg.kd_temperature}: must be above 0, e.g. 4"),
        _one_of("--target-kind", cfg.target_kind, BUDGET_KINDS),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message + "; see --help")
    if cfg.arch is not None:
        get_arch(cfg.arch)
    if cfg.sync_bn and cfg.cpu:
        raise ConfigError("--sync-bn synchronises BatchNorm over GPU processes and needs CUDA; "
                          "drop it with --cpu")
    check_dp(cfg)
    _check_pruning(cfg)
    if cfg.command == "pipeline" and (cfg.train_epochs < 1 or cfg.finetune_epochs < 1):
        raise ConfigError("--train-epochs and --finetune-epochs need at least 1 epoch")
    check_written_files(cfg)


def _non_negative(flag: str, value: float) -> tuple[bool, str]:
    return math.isfinite(value) and value >= 0, f"{flag} {value}: must be 0 or positive"


def check_dp(cfg: RunConfig) -> None:
    """DataParallel copies the module per GPU per step: the copies of a compiled module wipe
    its parameters, and Accelerate's autocast forward stays bound to GPU 0's model."""
    several = cfg.gpus is None or cfg.gpus > 1 or "," in (cfg.gpu_ids or "")  # None: all
    if (cfg.mode == "dp" and not cfg.cpu and several
            and (cfg.compile or cfg.mixed_precision != "no")):
        raise ConfigError("--mode dp runs in FP32 without --compile; use --mode ddp for "
                          "--compile or --mixed-precision bf16/fp16")


def _check_pruning(cfg: RunConfig) -> None:
    if cfg.command == "prune":
        given = [f for f, v in (("--ratio", cfg.ratio), ("--target-params", cfg.target_params),
                                ("--target-macs", cfg.target_macs)) if v is not None]
        if not given:
            raise ConfigError("prune needs --ratio R with 0 < R < 1 (the fraction of channels "
                              "to remove), e.g. --ratio 0.5, or a budget: --target-params 4M "
                              "or --target-macs 100M")
        if len(given) > 1:
            raise ConfigError(f"{' and '.join(given)} both say how much to prune; give one")
        if cfg.ratio is not None:
            check_ratio(cfg.ratio)
    if cfg.command == "pipeline" and not cfg.targets:
        check_ratios(cfg.ratios)
    if cfg.command == "pipeline" and cfg.targets:
        twice = sorted({fmt_count(t) for t in cfg.targets if cfg.targets.count(t) > 1})
        if twice:
            raise ConfigError(f"--targets lists {', '.join(twice)} twice; give each budget once")
    check_scope(cfg.scope)


def check_ratio(ratio: float) -> float:
    """A prune ratio is the fraction of channels removed: strictly between 0 and 1."""
    if not 0 < ratio < 1:
        raise ConfigError(f"--ratio {ratio} is outside (0, 1); give the fraction of channels "
                          "to prune, e.g. 0.5")
    return ratio


def check_ratios(ratios: tuple[float, ...]) -> None:
    """At least one ratio, each valid, and no two that would write the same files."""
    if not ratios:
        raise ConfigError("--ratios is empty; give the prune ratios to study, e.g. "
                          "--ratios 0.5,0.9")
    for r in ratios:
        check_ratio(r)
    tags = [ratio_tag(r) for r in ratios]
    twice = sorted({t for t in tags if tags.count(t) > 1})
    if twice:
        raise ConfigError(f"--ratios lists {', '.join(f'{float(t) / 100:g}' for t in twice)} "
                          "twice; give each ratio once")


def check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise ConfigError(f"--scope {scope!r}: use {' or '.join(SCOPES)}; see --help")
    return scope


def parse_count(text: str | int | float, flag: str) -> int:
    """A count of params or MACs: 4000000, 4e6, 4M, 2.5M or 1.2G (K, M, G: 10^3, 10^6, 10^9)."""
    raw = str(text).strip()
    scale = {"K": 1e3, "M": 1e6, "G": 1e9}.get(raw[-1:].upper(), 1)
    try:
        value = float(raw[:-1] if scale != 1 else raw) * scale
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 1:
        raise ConfigError(f"{flag} {raw!r} is not a positive count; write e.g. 4M, 4e6 or "
                          "4000000 (K, M, G suffixes)")
    return int(round(value))


def check_batch_split(batch_size: int, processes: int, flag: str = "--batch-size") -> int:
    """DDP splits the global batch evenly; returns the per-process batch."""
    if processes > 1 and batch_size % processes:
        nearest = max(processes, round(batch_size / processes) * processes)
        raise ConfigError(f"{flag} {batch_size} does not split evenly over {processes} "
                          f"processes; use a multiple of {processes} (e.g. {flag} {nearest})")
    return batch_size // processes


def check_written_files(cfg: RunConfig) -> None:
    """No run writes over its input or onto a folder (found before any work, not after it)."""
    sources = [(s, w) for s, w in ((input_checkpoint(cfg), "the input checkpoint"),
                                   (cfg.teacher, "the --teacher checkpoint")) if s]
    for what, path in written_files(cfg):
        for src, name in sources:
            if path.resolve() == Path(src).resolve():
                raise ConfigError(f"{what} {path} is {name}; choose another path (slimtune "
                                  "never overwrites its source)")
        if path.is_dir():
            raise ConfigError(f"{what} {path} is a folder; give a file path")


def check_tracker(name: str) -> None:
    """Accelerate only warns and runs on untracked when a tracker is missing; refuse instead.
    (Reads Accelerate's own tracker table, which imports torch: called where a run starts.)"""
    import accelerate.utils
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    if name != "all" and name not in LOGGER_TYPE_TO_CLASS:
        raise ConfigError(f"--log-with {name!r} is not an Accelerate tracker; use one of "
                          f"{', '.join(LOGGER_TYPE_TO_CLASS)}")
    available = getattr(accelerate.utils, f"is_{name}_available", None)
    if available is not None and not available():
        raise ConfigError(f"--log-with {name}: {name} is not installed; pip install {name} "
                          "or leave out --log-with")

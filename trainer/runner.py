"""Worker side of every command: build the Accelerator, data and model, run, save.

``run_worker(cfg)`` is what ``python -m trainer <command>`` (under accelerate launch or
torchrun) and the CLI's in-process mode both call.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

from trainer import dist
from trainer.checkpoint import build_model, load_checkpoint, make_checkpoint, save_checkpoint
from trainer.config import RunConfig
from trainer.engine import STOP, evaluate, make_optimizer
from trainer.errors import ConfigError, DataError, StopRequested
from trainer.fit import fit, saved_config
from trainer.models import ResNet50, count_params
from trainer.progress import console, say

COMMANDS = ("train", "prune", "finetune", "evaluate", "pipeline")
DATASETS = ("cifar10", "cifar100", "imagefolder", "synthetic")


# ---------------------------------------------------------------- validation (pure)


def validate(cfg: RunConfig) -> None:
    """Refuse settings that cannot work, before anything starts or is written."""
    checks = [
        (cfg.command in COMMANDS, f"unknown command {cfg.command!r}"),
        (cfg.dataset in DATASETS, (f"--dataset {cfg.dataset!r} is unknown; use one of "
                                  f"{', '.join(DATASETS)}")),
        (cfg.epochs >= 1, f"--epochs {cfg.epochs}: need at least 1 epoch"),
        (math.isfinite(cfg.lr) and cfg.lr > 0,
         f"--lr {cfg.lr}: the learning rate must be a positive number"),
        (cfg.batch_size >= 1, f"--batch-size {cfg.batch_size}: need at least 1"),
        (cfg.finetune_batch_size >= 1,
         f"--finetune-batch-size {cfg.finetune_batch_size}: need at least 1"),
        (cfg.optimizer in ("sgd", "adam"), f"--optimizer {cfg.optimizer!r}: use sgd or adam"),
        (cfg.mode in ("ddp", "dp"), f"--mode {cfg.mode!r}: use ddp or dp"),
        (cfg.mixed_precision in ("no", "bf16", "fp16"),
         f"--mixed-precision {cfg.mixed_precision!r}: use no, bf16 or fp16"),
        (cfg.loader in ("auto", "torch", "gpu"),
         f"--loader {cfg.loader!r}: use auto, torch or gpu"),
        (math.isfinite(cfg.sparsity) and cfg.sparsity >= 0,
         f"--sparsity {cfg.sparsity}: must be 0 or positive"),
        (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0,
         f"--weight-decay {cfg.weight_decay}: must be 0 or positive"),
        (math.isfinite(cfg.warmup_epochs) and cfg.warmup_epochs >= 0,
         f"--warmup-epochs {cfg.warmup_epochs}: must be 0 or positive"),
        (math.isfinite(cfg.momentum) and 0 <= cfg.momentum < 1,
         f"--momentum {cfg.momentum}: must be in [0, 1), e.g. 0.9"),
        (cfg.seed >= 0, f"--seed {cfg.seed}: must be 0 or more"),
        (cfg.dist_timeout >= 1, f"--dist-timeout {cfg.dist_timeout}: need at least 1 second"),
        (cfg.min_channels >= 0, f"--min-channels {cfg.min_channels}: must be 0 or more"),
        (cfg.num_workers >= 0, f"--num-workers {cfg.num_workers}: must be 0 or more"),
        (cfg.limit_batches is None or cfg.limit_batches >= 1,
         f"--limit-batches {cfg.limit_batches}: must be 1 or more"),
        (cfg.image_size >= 8, f"--image-size {cfg.image_size}: must be 8 or more"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message + "; see --help")
    several = cfg.gpus is None or cfg.gpus > 1 or "," in (cfg.gpu_ids or "")  # None: all
    dp = cfg.mode == "dp" and not cfg.cpu and several
    if dp and (cfg.compile or cfg.mixed_precision != "no"):
        # DataParallel copies the module per GPU per step: the copies of a compiled module
        # wipe its parameters, and Accelerate's autocast forward stays bound to GPU 0's model
        raise ConfigError("--mode dp runs in FP32 without --compile; use --mode ddp for "
                          "--compile or --mixed-precision bf16/fp16")
    if cfg.command == "prune" and cfg.ratio is None:
        raise ConfigError("prune needs --ratio R with 0 < R < 1 (the fraction of channels to "
                          "remove), e.g. --ratio 0.5")
    ratios = {"pipeline": list(cfg.ratios), "prune": [cfg.ratio]}.get(cfg.command, [])
    for r in ratios:
        if not 0 < r < 1:
            raise ConfigError(f"--ratio {r} is outside (0, 1); give the fraction of channels "
                              "to prune, e.g. 0.5")
    if cfg.command == "pipeline":
        _check_pipeline_ratios(cfg.ratios)
    if cfg.command == "pipeline" and (cfg.train_epochs < 1 or cfg.finetune_epochs < 1):
        raise ConfigError("--train-epochs and --finetune-epochs need at least 1 epoch")
    if cfg.log_with:
        _check_tracker(cfg.log_with)
    if cfg.scope not in ("all", "prunable"):
        raise ConfigError(f"--scope {cfg.scope!r}: use all or prunable; see --help")
    _check_written_files(cfg)


def _check_tracker(name: str) -> None:
    """Accelerate only warns and runs on untracked when a tracker is missing; refuse instead."""
    import accelerate.utils
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    if name != "all" and name not in LOGGER_TYPE_TO_CLASS:
        raise ConfigError(f"--log-with {name!r} is not an Accelerate tracker; use one of "
                          f"{', '.join(LOGGER_TYPE_TO_CLASS)}")
    available = getattr(accelerate.utils, f"is_{name}_available", None)
    if available is not None and not available():
        raise ConfigError(f"--log-with {name}: {name} is not installed; pip install {name} "
                          "or leave out --log-with")


def written_files(cfg: RunConfig) -> list[tuple[str, Path]]:
    """(what, path) for each file a train/finetune/prune run writes (pipeline: its output)."""
    from trainer.engine import run_paths

    out = output_path(cfg)
    if out is None:
        return []
    if cfg.command == "prune":
        return [("--output", out), ("the γ figure", Path("plots") / f"{out.stem}_gamma.png")]
    if cfg.command not in ("train", "finetune"):
        return [("--output", out)]
    paths = run_paths(out)
    return [("--output", out), ("--plot" if cfg.plot else "the curves figure", plot_path(cfg, out)),
            (f"the resume file of --output {out}:", paths["last"]),
            (f"the metrics CSV of --output {out}:", paths["csv"])]


def _check_written_files(cfg: RunConfig) -> None:
    """No run writes over its input or onto a folder (found before any work, not after it)."""
    src = input_checkpoint(cfg)
    for what, path in written_files(cfg):
        if src and path.resolve() == Path(src).resolve():
            raise ConfigError(f"{what} {path} is the input checkpoint; choose another path "
                              "(slimtune never overwrites its source)")
        if path.is_dir():
            raise ConfigError(f"{what} {path} is a folder; give a file path")


def _check_pipeline_ratios(ratios: tuple[float, ...]) -> None:
    """At least one ratio, and no two that would write the same files."""
    from trainer.pipeline import ratio_tag

    if not ratios:
        raise ConfigError("--ratios is empty; give the prune ratios to study, e.g. "
                          "--ratios 0.5,0.9")
    tags = [ratio_tag(r) for r in ratios]
    twice = sorted({t for t in tags if tags.count(t) > 1})
    if twice:
        raise ConfigError(f"--ratios lists {', '.join(f'{float(t) / 100:g}' for t in twice)} "
                          "twice; give each ratio once")


def input_checkpoint(cfg: RunConfig) -> str | None:
    """The checkpoint a command starts from (train: --init), defaults applied; None if none."""
    if cfg.command == "train":
        return cfg.init
    defaults = {"finetune": "checkpoints/model_prune.pth", "prune": "checkpoints/model_sparse.pth"}
    return cfg.checkpoint or defaults.get(cfg.command)


def preflight(cfg: RunConfig) -> None:
    """The input checks each rank makes first, made once by the launcher before a job of
    several processes starts: a bad checkpoint or a missing dataset is then one line, with no
    process started and no file written, not one report per rank after torchrun's own.

    Reads the input checkpoint (safe loader) and looks for the dataset's files without
    reading them; what only reading finds (a truncated CIFAR file) is still the ranks' to say.
    """
    from trainer.data import dataset_classes

    src = input_checkpoint(cfg)
    ckpt = load_checkpoint(src) if src else None
    if cfg.command == "prune":  # prune measures accuracy only if it can: data is optional
        return
    classes = dataset_classes(cfg.dataset, cfg.data_dir, image_size=cfg.image_size,
                              download=cfg.download, synthetic_train=cfg.synthetic_train,
                              synthetic_test=cfg.synthetic_test)
    if ckpt is not None and classes is not None and classes != ckpt["num_classes"]:
        what = f"--init {src}" if cfg.command == "train" else f"checkpoint {src}"
        raise DataError(f"the {cfg.dataset} data has {classes} classes but {what} has "
                        f"{ckpt['num_classes']}; use a matching --dataset/--data-dir or "
                        "checkpoint")


def ensure_writable(folder: Path) -> None:
    """Create ``folder`` and prove a file can be written there (root ignores mode bits)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"cannot write to {folder} ({exc.strerror or exc}); "
                          "choose a writable --output / --plot / --workdir") from None


# ---------------------------------------------------------------- output naming


def output_path(cfg: RunConfig) -> Path | None:
    """Where a command writes its main checkpoint (None for evaluate)."""
    if cfg.output:
        return Path(cfg.output)
    if cfg.command == "train":
        return Path("checkpoints") / ("model_sparse.pth" if cfg.sparsity > 0 else "model.pth")
    if cfg.command == "prune":
        return Path("checkpoints/model_prune.pth")
    if cfg.command == "finetune":
        src = Path(input_checkpoint(cfg))
        return src.with_name(src.stem + "_finetune.pth")
    if cfg.command == "pipeline":
        return Path(cfg.workdir) / "checkpoints" / "model_sparse.pth"
    return None


def plot_path(cfg: RunConfig, output: Path, plots_dir: Path = Path("plots")) -> Path:
    """Curves figure: ``plots/finetuning_results.png`` for the lab's model_prune.pth."""
    if cfg.plot:
        return Path(cfg.plot)
    if cfg.command == "finetune" and Path(cfg.checkpoint or "").name == "model_prune.pth":
        return plots_dir / "finetuning_results.png"
    return plots_dir / f"{output.stem}.png"


# ---------------------------------------------------------------- runtime


def make_accelerator(cfg: RunConfig):
    """The Accelerator for this process; FP32 unless --mixed-precision says otherwise."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    # Collectives fail after dist_timeout seconds instead of hanging forever.
    handlers = [InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.dist_timeout))]
    kwargs = {}
    if cfg.log_with:
        kwargs = {"log_with": cfg.log_with, "project_dir": str(Path(cfg.workdir) / "runs")}
    try:
        acc = Accelerator(cpu=cfg.cpu, mixed_precision=cfg.mixed_precision,
                          kwargs_handlers=handlers, **kwargs)
    except (ValueError, ImportError) as exc:
        raise ConfigError(f"cannot start Accelerate ({str(exc).splitlines()[0]}); "
                          "check --mixed-precision / --log-with / --cpu") from None
    if acc.device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
        if not cfg.tf32:  # strict IEEE FP32 for matmul and conv
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.backends.cuda.matmul.allow_tf32 = False
                torch.backends.cudnn.allow_tf32 = False
    if cfg.debug:
        torch.autograd.set_detect_anomaly(True)
    return acc


def per_process_batch(cfg: RunConfig) -> int:
    """--batch-size is the global batch; DDP splits it over processes, DP does not."""
    n = cfg.num_processes
    if cfg.mode == "ddp" and cfg.batch_size % n:
        raise ConfigError(f"--batch-size {cfg.batch_size} does not divide over {n} processes; "
                          f"use a multiple of {n}")
    return cfg.batch_size // n if cfg.mode == "ddp" else cfg.batch_size


def load_data(cfg: RunConfig):
    from trainer.data import build_datasets

    return build_datasets(cfg.dataset, cfg.data_dir, image_size=cfg.image_size,
                          download=cfg.download, synthetic_train=cfg.synthetic_train,
                          synthetic_test=cfg.synthetic_test, seed=cfg.seed)


def loader_kind(cfg: RunConfig, device: torch.device) -> str:
    if cfg.loader != "auto":
        return cfg.loader
    return "gpu" if device.type == "cuda" and cfg.dataset != "imagefolder" else "torch"


def make_loaders(cfg: RunConfig, data, accelerator):
    from trainer.data import make_test_loader, make_train_loader

    batch = per_process_batch(cfg)
    kind = loader_kind(cfg, accelerator.device)
    workers = 0 if cfg.debug else cfg.num_workers
    train = make_train_loader(data, batch_size=batch, num_workers=workers,
                              rank=accelerator.process_index,
                              world_size=accelerator.num_processes, seed=cfg.seed, kind=kind,
                              device=accelerator.device, limit_batches=cfg.limit_batches,
                              channels_last=_channels_last(cfg, accelerator))
    test = make_test_loader(data, batch_size=batch, num_workers=workers, kind=kind,
                            rank=accelerator.process_index,
                            world_size=accelerator.num_processes, device=accelerator.device)
    if not getattr(test, "exact_shard", False):
        test = accelerator.prepare(test)  # shards + pads; evaluate() uses gather_for_metrics
    return train, test


def _channels_last(cfg: RunConfig, accelerator) -> bool:
    return cfg.channels_last and accelerator.device.type == "cuda"


def prepare_model(model: nn.Module, cfg: RunConfig, accelerator, optimizer=None):
    """Device, memory format, compile, DDP (via Accelerate) and DP (after prepare)."""
    model = model.to(accelerator.device)
    if _channels_last(cfg, accelerator):
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model = torch.compile(model)
    if optimizer is None:
        model = accelerator.prepare(model)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    if cfg.mode == "dp" and accelerator.device.type == "cuda" and torch.cuda.device_count() > 1:
        model = nn.DataParallel(model)  # after prepare, so saved keys carry no prefix
    return model, optimizer


def check_classes(data, num_classes: int, what: str) -> None:
    if data.num_classes != num_classes:
        raise DataError(f"the {data.name} data has {data.num_classes} classes but {what} has "
                        f"{num_classes}; use a matching --dataset/--data-dir or checkpoint")


# ---------------------------------------------------------------- commands


def run_training(cfg: RunConfig, accelerator, model: nn.Module, data, *, output: Path,
                 plot: Path, extra: dict, title: str):
    """Optimizer + loaders + fit: the part train and finetune share."""
    ensure_writable(output.parent)
    ensure_writable(plot.parent)
    # saved resolved: a resume on another device must not switch loaders (and augmentation)
    cfg = cfg.replace(loader=loader_kind(cfg, accelerator.device))
    train_loader, test_loader = make_loaders(cfg, data, accelerator)
    model = model.to(accelerator.device)
    optimizer = make_optimizer(model, cfg)
    model, optimizer = prepare_model(model, cfg, accelerator, optimizer)
    if cfg.log_with:  # e.g. TensorBoard event files under <workdir>/runs/<output stem>
        accelerator.init_trackers(output.stem, config={
            k: v for k, v in saved_config(cfg).items() if isinstance(v, (int, float, str, bool))})
    return fit(model, optimizer, accelerator=accelerator, cfg=cfg, train_loader=train_loader,
               test_loader=test_loader, output=output, plot=plot, extra=extra, title=title)


def zero_init_last_bn(model: ResNet50) -> ResNet50:
    """Start every residual block as identity (bn3 gamma = 0; Goyal et al. 2017).

    From PyTorch's default init this ResNet-50 diverges at lr 0.1 (gradient norm ~290 at
    step 0); with each block's last BN at zero the norm is ~0.3 and training is stable.
    """
    for name, module in model.named_modules():
        if name.endswith(".bn3"):
            nn.init.zeros_(module.weight)
    return model


def fresh_model(num_classes: int) -> ResNet50:
    """The model ``train`` starts from without --init (seed the RNG first)."""
    return zero_init_last_bn(ResNet50(num_classes))


def cmd_train(cfg: RunConfig, accelerator, plots_dir: Path = Path("plots")):
    with accelerator.main_process_first():  # one rank downloads, the others then read
        data = load_data(cfg)
    torch.manual_seed(cfg.seed)  # the same initial model on every rank
    if cfg.init:
        model = build_model(load_checkpoint(cfg.init))
        check_classes(data, model.num_classes, f"--init {cfg.init}")
    else:
        model = fresh_model(data.num_classes)
    output = output_path(cfg)
    title = f"train {output.stem} (sparsity {cfg.sparsity:g})"
    return run_training(cfg, accelerator, model, data, output=output,
                        plot=plot_path(cfg, output, plots_dir), extra={}, title=title)


def cmd_finetune(cfg: RunConfig, accelerator, plots_dir: Path = Path("plots")):
    src = input_checkpoint(cfg)
    cfg = cfg.replace(checkpoint=src)
    ckpt = load_checkpoint(src)
    data = load_data(cfg)
    check_classes(data, ckpt["num_classes"], f"checkpoint {src}")
    model = build_model(ckpt)
    output = output_path(cfg)
    extra = {"prune": ckpt["prune"]} if "prune" in ckpt else {}
    return run_training(cfg, accelerator, model, data, output=output,
                        plot=plot_path(cfg, output, plots_dir), extra=extra,
                        title=f"fine-tune {Path(src).name}")


def evaluate_model(model: nn.Module, cfg: RunConfig, accelerator, data) -> dict:
    from trainer.data import make_test_loader

    kind = loader_kind(cfg, accelerator.device)
    test = make_test_loader(data, batch_size=max(per_process_batch(cfg), 1),
                            num_workers=0 if cfg.debug else cfg.num_workers, kind=kind,
                            rank=accelerator.process_index,
                            world_size=accelerator.num_processes, device=accelerator.device)
    if not getattr(test, "exact_shard", False):
        test = accelerator.prepare(test)
    model = model.to(accelerator.device)
    if _channels_last(cfg, accelerator):
        model = model.to(memory_format=torch.channels_last)
    return evaluate(model, test, accelerator)


def cmd_evaluate(cfg: RunConfig, accelerator, as_json: bool = False) -> dict:
    if not cfg.checkpoint:
        raise ConfigError("evaluate needs a checkpoint: slimtune evaluate CKPT")
    ckpt = load_checkpoint(cfg.checkpoint)
    data = load_data(cfg)
    check_classes(data, ckpt["num_classes"], f"checkpoint {cfg.checkpoint}")
    metrics = evaluate_model(build_model(ckpt), cfg, accelerator, data)
    if as_json:
        if dist.is_main():
            print(json.dumps(metrics))
    else:
        say(f"{Path(cfg.checkpoint).name}: test loss {metrics['loss']:.4f}, accuracy "
            f"{metrics['accuracy']:.2f}% ({metrics['correct']}/{metrics['total']}) on {data.name}")
    return metrics


def cmd_prune(cfg: RunConfig, accelerator, plots_dir: Path = Path("plots")) -> dict:
    from trainer.prune import all_gammas, prune

    src = input_checkpoint(cfg)
    ckpt = load_checkpoint(src)
    model = build_model(ckpt)
    output = output_path(cfg)
    if output.resolve() == Path(src).resolve():
        raise ConfigError(f"--output {output} is the input checkpoint; choose another path")
    ensure_writable(output.parent)
    result = prune(model, cfg.ratio, scope=cfg.scope, min_channels=cfg.min_channels)
    ensure_writable(plots_dir)  # after prune's own checks: a refused prune creates no folder
    acc_before = acc_after = None
    if cfg.eval:
        try:
            data = load_data(cfg)
            check_classes(data, ckpt["num_classes"], f"checkpoint {src}")
            acc_before = evaluate_model(model, cfg, accelerator, data)["accuracy"]
            acc_after = evaluate_model(result.model, cfg, accelerator, data)["accuracy"]
        except DataError as exc:
            say(f"[yellow]note:[/] accuracy not measured ({exc})")
    meta = {"ratio": cfg.ratio, "threshold": result.threshold, "scope": cfg.scope,
            "min_channels": cfg.min_channels, "source": str(src),
            "params_before": result.params_before, "params_after": result.params_after,
            "acc_before": acc_before, "acc_after": acc_after, "min_channels_kept": result.kept_min}
    if dist.is_main():
        save_checkpoint(output, make_checkpoint(result.model, prune=meta, config=saved_config(cfg)))
        from trainer.plots import plot_gamma_hist

        gamma_png = plot_gamma_hist(all_gammas(model, cfg.scope),
                                    plots_dir / f"{output.stem}_gamma.png",
                                    threshold=result.threshold,
                                    title=f"BatchNorm |γ| of {Path(src).name}",
                                    label=f"threshold {result.threshold:.4g} (ratio {cfg.ratio:g})")
        _print_prune_summary(result, meta, output, gamma_png)
    dist.barrier()  # the pruned file exists before any rank reads it
    return {**meta, "output": str(output)}


def _print_prune_summary(result, meta: dict, output: Path, gamma_png: Path) -> None:
    from rich.table import Table

    from trainer.prune import stage_summary

    table = Table(title=f"pruned {Path(meta['source']).name} at ratio {meta['ratio']:g}")
    for col in ("stage", "kept / total (bn1+bn2)", "kept %"):
        table.add_column(col, justify="right")
    rows = stage_summary(result.masks)
    for stage, kept, total in rows:
        table.add_row(stage, f"{kept} / {total}", f"{100 * kept / total:.1f}%")
    before, after = meta["params_before"], meta["params_after"]
    table.add_section()
    table.add_row("params", f"{before:,} -> {after:,}", f"{100 * after / before:.1f}%")
    table.add_row("threshold |γ|", f"{meta['threshold']:.6g}", f"scope {meta['scope']}")
    if meta["acc_before"] is not None:
        table.add_row("test acc", f"{meta['acc_before']:.2f}% -> {meta['acc_after']:.2f}%",
                      "right after")
    console.print(table)
    removed = 1 - sum(k for _, k, _ in rows) / sum(t for _, _, t in rows)
    if meta["scope"] == "all" and removed < 0.5 * meta["ratio"]:
        # bn3 holds 2/3 of all channels and is never pruned: when its γ are the smallest
        # (zero-initialised, short training), the threshold lands among them.
        say(f"[yellow]note:[/] only {100 * removed:.1f}% of the prunable (bn1/bn2) channels "
            f"were removed at ratio {meta['ratio']:g}: the threshold fell among the stem/bn3 γ, "
            "which are never pruned; --scope prunable ranks bn1/bn2 only")
    if result.ties > 1 and removed > meta["ratio"] + 0.02:
        # e.g. γ that only the L1 term moved, by the same steps: equal to many digits
        say(f"[yellow]note:[/] {result.ties} channels have |γ| equal to the threshold and are "
            f"removed with it (only |γ| strictly above is kept), so {100 * removed:.1f}% of the "
            f"prunable channels went at ratio {meta['ratio']:g}; train longer or lower --ratio")
    if result.kept_min:
        say(f"[yellow]note:[/] the threshold would have emptied {len(result.kept_min)} layer(s); "
            f"kept their {meta['min_channels']} largest-|γ| channel(s): "
            f"{', '.join(result.kept_min)}")
    say(f"wrote {output} and {gamma_png}")


def run_worker(cfg: RunConfig) -> int:
    """Run ``cfg.command`` in this process (one rank of a job, or the whole job)."""
    validate(cfg)
    accelerator = make_accelerator(cfg)
    cfg = cfg.replace(num_processes=accelerator.num_processes)
    if cfg.debug:
        say("resolved settings:", cfg.to_dict())
    STOP.install()
    try:
        if cfg.command == "evaluate":
            cmd_evaluate(cfg, accelerator, as_json=cfg.json)
        elif cfg.command == "prune":
            cmd_prune(cfg, accelerator)
        elif cfg.command == "pipeline":
            from trainer.pipeline import run_pipeline

            run_pipeline(cfg, accelerator)
        else:
            {"train": cmd_train, "finetune": cmd_finetune}[cfg.command](cfg, accelerator)
    except StopRequested as stop:
        dist.report_to_launcher(str(stop), stop.exit_code)
        if dist.is_main() and (stop.resumable or cfg.command == "pipeline"):
            console.print(f"{stop}; the last finished epoch is saved. Resume with the same "
                          "command plus --resume", style="yellow")
        elif dist.is_main():
            console.print(f"{stop}, before any epoch finished: nothing to resume; run the "
                          "same command again", style="yellow")
        return stop.exit_code
    finally:
        # A rank of a multi-process job keeps the stop handlers until it exits: when one rank
        # dies, the agent SIGTERMs the others, and the default handler killed a survivor
        # between its error and its report (the launcher then had no rank to name).
        if dist.world_size() == 1:
            STOP.restore()
        end_run(accelerator)
    return 0


def end_run(accelerator) -> None:
    """Finish the trackers; in one process, also Accelerate's end of training.

    A rank of a multi-process job keeps its process group and leaves through
    ``os._exit`` (``trainer.__main__.leave``), which frees it with the process. Destroying a
    gloo group deadlocked on torch 2.4 (seen here: the main thread, holding the GIL, joins a
    gloo thread that waits for the GIL to free a finished all-gather's tensors).
    """
    if dist.world_size() > 1:
        for tracker in accelerator.trackers:
            tracker.finish()
    else:
        accelerator.end_training()


def params_of(ckpt: dict) -> int:
    return count_params(build_model(ckpt))

"""The worker side of train, finetune, evaluate and prune: inputs in, files out.

Each ``cmd_*`` takes the run's settings and the Accelerator (``trainer.worker.run_worker``
builds it) and runs on every rank of a job; only the main process writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trainer import dist
from trainer.archs import DEFAULT_ARCH
from trainer.checkpoint import build_model, load_checkpoint, make_checkpoint, save_checkpoint
from trainer.config import RunConfig, saved_config
from trainer.engine import evaluate, make_optimizer
from trainer.errors import ConfigError, DataError
from trainer.files import ensure_writable
from trainer.fit import fit
from trainer.models import fresh_model
from trainer.paths import PLOTS, gamma_plot_path, input_checkpoint, output_path, plot_path
from trainer.progress import say
from trainer.runtime import (
    check_classes,
    evaluation_loader,
    load_data,
    loader_kind,
    prepare_model,
    prepare_teacher,
    to_device,
    training_loader,
)


def preflight(cfg: RunConfig) -> None:
    """The input checks each rank makes first, made once by the launcher before a job of
    several processes starts: a bad checkpoint or a missing dataset is then one line, with no
    process started and no file written, not one report per rank after torchrun's own.

    Reads the input checkpoint (safe loader) and looks for the dataset's files without
    reading them; what only reading finds (a truncated CIFAR file) is still the ranks' to say.
    """
    from trainer.data import dataset_classes

    src = input_checkpoint(cfg)
    ckpt = load_checkpoint(src, cfg.arch) if src else None
    if cfg.teacher and ckpt is not None:
        load_teacher(cfg.teacher, ckpt["num_classes"])
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


def run_training(cfg: RunConfig, accelerator, model, data, *, output: Path, plot: Path,
                 extra: dict, title: str, teacher=None):
    """Optimizer + loaders + fit: the part train and finetune share."""
    ensure_writable(output.parent)
    ensure_writable(plot.parent)
    # saved resolved: a resume on another device must not switch loaders (and augmentation)
    cfg = cfg.replace(loader=loader_kind(cfg, accelerator.device))
    train = training_loader(cfg, data, accelerator)
    test = evaluation_loader(cfg, data, accelerator)
    model = model.to(accelerator.device)
    optimizer = make_optimizer(model, cfg)
    model, optimizer = prepare_model(model, cfg, accelerator, optimizer)
    if cfg.log_with:  # e.g. TensorBoard event files under <workdir>/runs/<output stem>
        accelerator.init_trackers(output.stem, config={
            k: v for k, v in saved_config(cfg).items() if isinstance(v, (int, float, str, bool))})
    try:
        return fit(model, optimizer, accelerator=accelerator, cfg=cfg, train_loader=train,
                   test_loader=test, output=output, plot=plot, extra=extra, title=title,
                   teacher=teacher)
    finally:
        train.close()  # the workers go now, not whenever a stop's traceback is freed


def cmd_train(cfg: RunConfig, accelerator, plots_dir: Path = PLOTS):
    with accelerator.main_process_first():  # one rank downloads, the others then read
        data = load_data(cfg)
    torch.manual_seed(cfg.seed)  # the same initial model on every rank
    if cfg.init:
        model = build_model(load_checkpoint(cfg.init, cfg.arch))
        check_classes(data, model.num_classes, f"--init {cfg.init}")
    else:
        model = fresh_model(cfg.arch or DEFAULT_ARCH, data.num_classes, cfg.gamma_init)
    output = output_path(cfg)
    title = f"train {output.stem} (sparsity {cfg.sparsity:g})"
    return run_training(cfg, accelerator, model, data, output=output,
                        plot=plot_path(cfg, output, plots_dir), extra={}, title=title)


def cmd_finetune(cfg: RunConfig, accelerator, plots_dir: Path = PLOTS):
    src = input_checkpoint(cfg)
    cfg = cfg.replace(checkpoint=src)
    ckpt = load_checkpoint(src, cfg.arch)
    data = load_data(cfg)
    check_classes(data, ckpt["num_classes"], f"checkpoint {src}")
    model = build_model(ckpt)
    teacher = None
    if cfg.teacher:
        teacher = prepare_teacher(build_model(load_teacher(cfg.teacher, ckpt["num_classes"])),
                                  cfg, accelerator)
    output = output_path(cfg)
    extra = {"prune": ckpt["prune"]} if "prune" in ckpt else {}
    title = f"fine-tune {Path(src).name}" + (f" (teacher {Path(cfg.teacher).name})"
                                             if cfg.teacher else "")
    return run_training(cfg, accelerator, model, data, output=output,
                        plot=plot_path(cfg, output, plots_dir), extra=extra, title=title,
                        teacher=teacher)


def load_teacher(path: str, num_classes: int) -> dict:
    """The teacher's checkpoint; refused when its classes are not the student's."""
    ckpt = load_checkpoint(path)
    if ckpt["num_classes"] != num_classes:
        raise ConfigError(f"--teacher {path} has {ckpt['num_classes']} classes but the model "
                          f"fine-tuned has {num_classes}; give a teacher trained on the same "
                          "classes")
    return ckpt


def evaluate_model(model, cfg: RunConfig, accelerator, data) -> dict:
    return evaluate(to_device(model, cfg, accelerator), evaluation_loader(cfg, data, accelerator),
                    accelerator)


def cmd_evaluate(cfg: RunConfig, accelerator) -> dict:
    if not cfg.checkpoint:
        raise ConfigError("evaluate needs a checkpoint: slimtune evaluate CKPT")
    ckpt = load_checkpoint(cfg.checkpoint, cfg.arch)
    data = load_data(cfg)
    check_classes(data, ckpt["num_classes"], f"checkpoint {cfg.checkpoint}")
    metrics = evaluate_model(build_model(ckpt), cfg, accelerator, data)
    if cfg.json:
        if dist.is_main():
            print(json.dumps(metrics))
    else:
        say(f"{Path(cfg.checkpoint).name}: test loss {metrics['loss']:.4f}, accuracy "
            f"{metrics['accuracy']:.2f}% ({metrics['correct']}/{metrics['total']}) on {data.name}")
    return metrics


def _accuracy_before_after(cfg: RunConfig, accelerator, ckpt: dict, src: str, before, after):
    """Test accuracy of the model before and right after pruning; (None, None) without data."""
    if not cfg.eval:
        return None, None
    try:
        data = load_data(cfg)
        check_classes(data, ckpt["num_classes"], f"checkpoint {src}")
        return (evaluate_model(before, cfg, accelerator, data)["accuracy"],
                evaluate_model(after, cfg, accelerator, data)["accuracy"])
    except DataError as exc:
        say(f"[yellow]note:[/] accuracy not measured ({exc})")
        return None, None


def prune_as_asked(model, cfg: RunConfig):
    """At --ratio, or to the --target-params / --target-macs budget."""
    from trainer.prune import prune, prune_to_budget

    floors = {"scope": cfg.scope, "min_channels": cfg.min_channels, "round_to": cfg.round_to}
    if cfg.ratio is not None:
        return prune(model, cfg.ratio, **floors)
    kind = "params" if cfg.target_params is not None else "macs"
    target = cfg.target_params if kind == "params" else cfg.target_macs
    return prune_to_budget(model, target, kind, input_size=cfg.image_size, **floors)


def cmd_prune(cfg: RunConfig, accelerator, plots_dir: Path = PLOTS) -> dict:
    from trainer.prune import all_gammas, print_prune_summary

    src = input_checkpoint(cfg)
    ckpt = load_checkpoint(src, cfg.arch)
    model = build_model(ckpt)
    output = output_path(cfg)
    ensure_writable(output.parent)
    result = prune_as_asked(model, cfg)
    ensure_writable(plots_dir)  # after prune's own checks: a refused prune creates no folder
    acc_before, acc_after = _accuracy_before_after(cfg, accelerator, ckpt, src, model,
                                                   result.model)
    meta = {"ratio": result.ratio, "threshold": result.threshold, "scope": cfg.scope,
            "min_channels": cfg.min_channels, "round_to": cfg.round_to,
            "budget": result.budget, "source": str(src),
            "params_before": result.params_before, "params_after": result.params_after,
            "acc_before": acc_before, "acc_after": acc_after, "min_channels_kept": result.kept_min}
    if dist.is_main():
        save_checkpoint(output, make_checkpoint(result.model, prune=meta, config=saved_config(cfg)))
        from trainer.plots import plot_gamma_hist

        gamma_png = plot_gamma_hist(all_gammas(model, cfg.scope),
                                    gamma_plot_path(output, plots_dir),
                                    threshold=result.threshold,
                                    title=f"BatchNorm |γ| of {Path(src).name}",
                                    label=f"threshold {result.threshold:.4g} "
                                          f"(ratio {result.ratio:.4g})")
        print_prune_summary(result, meta, output, gamma_png)
    dist.barrier()  # the pruned file exists before any rank reads it
    return {**meta, "output": str(output)}

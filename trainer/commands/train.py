"""``train`` and ``finetune`` on the worker side: inputs in, a best checkpoint, its resume state,
metrics CSV and curves out. Each ``cmd_*`` takes the run's settings and the Accelerator
(``trainer.commands.worker.run_worker`` builds it) and runs on every rank of a job; only the
main process writes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.config.archs import DEFAULT_ARCH, user_arch_name
from trainer.config.derived import INHERITED, saved_config, with_data_defaults
from trainer.config.paths import PLOTS, input_checkpoint, output_path, plot_path
from trainer.config.settings import RunConfig
from trainer.config.usercode import allowing
from trainer.data.datasets import check_classes, dataset_classes
from trainer.errors import ConfigError, ParamError
from trainer.files.atomic import ensure_writable
from trainer.files.checkpoint import build_model, load_checkpoint
from trainer.files.pretrained import initial_model
from trainer.measure.plots import plot_curves
from trainer.measure.profiling import check_input_fits
from trainer.models.build import family, fresh_like, fresh_model
from trainer.prune.engine import copy_to_meta, model_size
from trainer.train import dist
from trainer.train.fit import fit
from trainer.train.loop import make_optimizer
from trainer.train.progress import say
from trainer.train.runtime import (
    evaluation_loader,
    load_data,
    loader_kind,
    prepare_model,
    prepare_teacher,
    training_loader,
)


def inherit_data_settings(run: RunConfig, quiet: bool = False) -> RunConfig:
    """``run`` with the data settings the command line left out (None) taken from its input
    checkpoint's saved settings (else the defaults); says which it took."""
    if all(getattr(run, name) is not None for name in INHERITED):
        return run
    src = input_checkpoint(run)
    saved = None
    if src and Path(src).is_file():  # else the command's own load names the problem
        saved = load_checkpoint(src, run.arch).get("config")
    run, taken = with_data_defaults(run, saved if isinstance(saved, dict) else None)
    if taken and not quiet:
        said = ", ".join(f"{ParamError.flag(n)} {getattr(run, n)}" for n in taken)
        say(f"data as {Path(src).name} was trained: {said} (flags given win)")
    return run


def preflight(run: RunConfig) -> None:
    """:func:`check_inputs`, with the user model --arch names allowed."""
    with allowing(user_arch_name(run.arch)):
        check_inputs(run)


def check_inputs(run: RunConfig) -> None:
    """The input checks each rank makes first, made once by the launcher before a job of
    several processes starts: a bad checkpoint or a missing dataset is then one line, with no
    process started and no file written, not one report per rank after torchrun's own.

    Reads the input checkpoint (safe loader) and looks for the dataset's files without
    reading them; what only reading finds (a truncated CIFAR file) is still the ranks' to say.
    """
    run = inherit_data_settings(run, quiet=True)
    src = input_checkpoint(run)
    ckpt = load_checkpoint(src, run.arch) if src else None
    if ckpt is not None:
        check_scratch_arch(run, ckpt)
    if run.teacher and ckpt is not None:
        load_teacher(run.teacher, ckpt["num_classes"])
    if run.command == "prune":  # prune measures accuracy only if it can: data is optional
        return
    classes = dataset_classes(run.dataset, run.data_dir, image_size=run.image_size,
                              download=run.download, synthetic_train=run.synthetic_train,
                              synthetic_test=run.synthetic_test)
    if ckpt is not None:
        flag = "--scratch-from" if run.scratch_from else "--init"
        what = f"{flag} {src}" if run.command == "train" else f"checkpoint {src}"
        check_classes(run.dataset, classes, ckpt["num_classes"], what)


def run_training(run: RunConfig, accelerator, model, data, *, output: Path, plot: Path,
                 extra: dict, title: str, teacher=None):
    """Optimizer + loaders + fit: the part train and finetune share."""
    check_input_fits(model, run.image_size, "--image-size")
    ensure_writable(output.parent)
    ensure_writable(plot.parent)
    # saved resolved: a resume on another device must not switch loaders (and augmentation)
    run = run.replace(loader=loader_kind(run, accelerator.device))
    train = training_loader(run, data, accelerator)
    test = evaluation_loader(run, data, accelerator)
    model = model.to(accelerator.device)
    optimizer = make_optimizer(model, run)
    model, optimizer = prepare_model(model, run, accelerator, optimizer)
    if run.log_with:  # e.g. TensorBoard event files under <workdir>/runs/<output stem>
        accelerator.init_trackers(output.stem, config={
            k: v for k, v in saved_config(run).items() if isinstance(v, (int, float, str, bool))})
    try:
        state = fit(model, optimizer, accelerator=accelerator, run=run, train_loader=train,
                    test_loader=test, output=output, extra=extra, title=title,
                    teacher=teacher)
    finally:
        train.close()  # the workers go now, not whenever a stop's traceback is freed
    if dist.is_main() and state.history["epoch"]:
        plot_curves(state.history, plot, title=title, best_epoch=state.best_epoch)
    return state


def cmd_train(run: RunConfig, accelerator, plots_dir: Path = PLOTS):
    with accelerator.main_process_first():  # one rank downloads, the others then read
        data = load_data(run)
    output = output_path(run)
    if run.scratch_from:
        model, run, extra = scratch_start(run, data)
        title = f"Scratch-{extra['scratch']['kind']} of {Path(run.scratch_from).name}"
    else:
        model, extra = _initial_model(run, data), {}
        title = f"train {output.stem} (sparsity {run.sparsity:g})"
    return run_training(run, accelerator, model, data, output=output,
                        plot=plot_path(run, output, plots_dir), extra=extra, title=title)


def _initial_model(run: RunConfig, data):
    """--init's model, or a fresh one of --arch (seeded: the same on every rank), refused
    before training if its family cannot prune it."""
    torch.manual_seed(run.seed)
    if run.init:  # a plain torchvision/timm state_dict too (trainer.files.pretrained)
        start = initial_model(run.init, run.arch, data.num_classes, run.image_size)
        if start.replaced:
            layer, classes = start.replaced
            say(f"--init {run.init}: its classifier {layer} has {classes} classes and the "
                f"{data.name} data {data.num_classes}; replaced {layer} by a freshly "
                "initialised one")
        model = start.model
    else:
        model = fresh_model(run.arch or DEFAULT_ARCH, data.num_classes, run.gamma_init,
                            input_size=run.image_size)
    family(model.arch).check_prunable(model)
    return model


def check_scratch_arch(run: RunConfig, ckpt: dict) -> None:
    """The recipe of a scratch run is --arch's (as the sparse run's was): it must be the file's."""
    if run.scratch_from and ckpt["arch"] != run.arch:
        raise ConfigError(f"--scratch-from {run.scratch_from} is a {ckpt['arch']} and --arch is "
                          f"{run.arch}; add --arch {ckpt['arch']} (its recipe is the sparse "
                          "run's)")


def scratch_epochs(epochs: int, kind: str, macs_unpruned: int, macs_pruned: int) -> int:
    """Scratch-E: ``epochs``; Scratch-B: ⌊epochs × MACs(unpruned) / MACs(pruned)⌋, the
    official main_B.py's ``int(epochs * base / pruned)``, here in exact integers (no float
    rounding)."""
    return epochs * macs_unpruned // macs_pruned if kind == "B" else epochs


def scratch_plan(run: RunConfig):
    """``train --scratch-from``'s plan: the run with Scratch-E's or Scratch-B's epochs, what the
    checkpoint records of it, and the pruned model. A file of the unpruned architecture
    (nothing pruned: as many MACs as --arch at full width) is refused."""
    src = run.scratch_from
    ckpt = load_checkpoint(src, run.arch)
    check_scratch_arch(run, ckpt)
    pruned = build_model(ckpt)
    check_input_fits(pruned, run.image_size, "--image-size")
    fam = family(pruned.arch)
    full = fam.skeleton(pruned.arch, pruned.num_classes, fam.default_widths(pruned.arch))
    macs = [model_size(m, "macs", run.image_size) for m in (full, copy_to_meta(pruned))]
    if macs[1] >= macs[0]:
        raise ConfigError(f"--scratch-from {src} has the unpruned architecture of {pruned.arch} "
                          f"({macs[1]:,} MACs, as at full width): training it from scratch is "
                          "plain train; give a pruned checkpoint (what prune writes)")
    kind = run.scratch or "E"
    epochs = scratch_epochs(run.epochs, kind, *macs)
    record = {"from": str(src), "kind": kind, "base_epochs": run.epochs, "epochs": epochs,
              "macs_unpruned": macs[0], "macs_pruned": macs[1], "input_size": run.image_size}
    return run.replace(epochs=epochs), record, pruned


def scratch_start(run: RunConfig, data):
    """``train --scratch-from``: a fresh model of the pruned file's architecture (seeded by
    --seed), the run with Scratch-B's epochs, and what the checkpoint records of it."""
    planned, record, pruned = scratch_plan(run)
    check_classes(data.name, data.num_classes, pruned.num_classes,
                  f"--scratch-from {run.scratch_from}")
    torch.manual_seed(run.seed)  # the same initial model on every rank
    model = fresh_like(pruned, run.gamma_init)
    if record["kind"] == "B":
        say(f"Scratch-B: {record['epochs']} epochs = ⌊{run.epochs} × "
            f"{record['macs_unpruned']:,} / {record['macs_pruned']:,} MACs⌋ (unpruned / "
            f"pruned, at {run.image_size}x{run.image_size})")
    return model, planned, {"scratch": record}


def cmd_finetune(run: RunConfig, accelerator, plots_dir: Path = PLOTS):
    src = input_checkpoint(run)
    run = run.replace(checkpoint=src)
    ckpt = load_checkpoint(src, run.arch)
    data = load_data(run)
    check_classes(data.name, data.num_classes, ckpt["num_classes"], f"checkpoint {src}")
    model = build_model(ckpt)
    teacher = None
    if run.teacher:
        teacher = prepare_teacher(build_model(load_teacher(run.teacher, ckpt["num_classes"])),
                                  run, accelerator)
    output = output_path(run)
    extra = {"prune": ckpt["prune"]} if "prune" in ckpt else {}
    title = f"fine-tune {Path(src).name}" + (f" (teacher {Path(run.teacher).name})"
                                             if run.teacher else "")
    return run_training(run, accelerator, model, data, output=output,
                        plot=plot_path(run, output, plots_dir), extra=extra, title=title,
                        teacher=teacher)


def load_teacher(path: str, num_classes: int) -> dict:
    """The teacher's checkpoint; refused when its classes are not the student's."""
    ckpt = load_checkpoint(path)
    if ckpt["num_classes"] != num_classes:
        raise ConfigError(f"--teacher {path} has {ckpt['num_classes']} classes but the model "
                          f"fine-tuned has {num_classes}; give a teacher trained on the same "
                          "classes")
    return ckpt

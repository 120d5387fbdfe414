"""The run commands: which settings each takes as options (declared once in
``trainer.config.settings``), the defaults it overrides and its help. Read by ``trainer.cli.app``
to build the Typer commands and by the launcher to pass a run on to ``python -m trainer``
(pure Python).

An option's name is its RunConfig field with ``_`` -> ``-`` (booleans as ``--x/--no-x``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trainer.config.archs import DEFAULT_ARCH, arch_choices, recipes_text
from trainer.config.checks import parse_count
from trainer.config.derived import INHERITED, option_help
from trainer.config.paths import CHECKPOINTS, DENSE, LAB_CURVES, PLOTS, PRUNED, SPARSE
from trainer.config.settings import FINETUNE_RECIPE, SCRATCH, TRAIN_RECIPE, RunConfig
from trainer.errors import ParamError

# train/pipeline: the arch picks these (trainer.config.archs.with_recipe fills them in).
ARCH_RECIPE: dict[str, Any] = {"gamma_init": None, "warmup_epochs": None}


DATA = ["dataset", "data_dir", "download", "image_size", "augment", "synthetic_train",
        "synthetic_test", "num_workers", "loader", "limit_batches"]
DEVICE = ["seed", "cpu", "threads", "debug", "mode", "mixed_precision", "tf32", "channels_last",
          "cudnn_benchmark", "compile", "sync_bn", "dist_timeout", "gpus", "gpu_ids",
          "accelerate_config", "dry_run", "num_machines", "machine_rank", "main_process_ip",
          "main_process_port"]
OPTIM = ["epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "warmup_epochs",
         "sparsity"]
RUN = ["output", "plot", "log_with", "resume", "force_resume", "overwrite"]
PRUNE = ["ratio", "target_params", "target_macs", "round_to", "scope", "min_channels", "eval",
         "criterion", "allocation", "taylor_batches", "bn_recalibrate"]
KD = ["teacher", "kd_alpha", "kd_temperature"]
PIPELINE = ["arch", "train_epochs", "finetune_epochs", "sparsity", "ratios", "targets",
            "target_kind", "passes", "kd", "kd_alpha", "kd_temperature", "round_to", "train_lr",
            "finetune_lr", "finetune_batch_size", "batch_size", "warmup_epochs", "gamma_init",
            "workdir",
            "scope", "min_channels", "eval", "log_with", "resume", "force_resume", "overwrite",
            "jobs", "gpus_per_job", "slurm", "job", "criteria", "allocations", "scratch",
            "taylor_batches", "bn_recalibrate"]


# scope prunable: a ratio is the fraction of bn1/bn2 channels removed, whatever the
# never-pruned bn3 γ look like (zero-initialised, they sit below everything).
PIPELINE_DEFAULTS: dict[str, Any] = {
    **ARCH_RECIPE, "sparsity": None, "batch_size": TRAIN_RECIPE["batch_size"],
    "ratios": "0.5,0.9", "scope": "prunable"}

# `demo` = `pipeline` with these defaults (option -> (default, why)), the one place they are
# set: sized so that after a short sparse run on 2 CPU cores most bn1/bn2 |γ| sit near zero,
# apart from the rest, and the 50% / 90% thresholds fall in that gap, not in noise.
DEMO: dict[str, tuple[Any, str]] = {
    "arch": ("resnet18", "the lab's family at 43% of ResNet-50's MACs: more epochs in the time"),
    "dataset": ("synthetic", "built in: no download"),
    "image_size": (16, "a quarter of the pixels: 2.3x the images/s of 32x32 on a CPU"),
    "synthetic_train": (1500, "enough images that the unpruned model learns well (~75%)"),
    "synthetic_test": (200, "measured after every epoch and prune; 200 keeps that quick"),
    "train_epochs": (5, "2 epochs at the full LR, where the L1 term moves γ, then ÷10, ÷100"),
    "batch_size": (16, "the L1 term moves γ per step: 94 steps an epoch, not 24 at 64"),
    "gamma_init": (0.2, "γ starts near 0, so the L1 steps can take the unused ones there"),
    "sparsity": (2e-3, "20x the paper's 1e-4 (set for 160 epochs); more stops learning"),
    "finetune_epochs": (3, "at LR 1e-3, 1e-4, 1e-5: the pruned model recovers, then settles"),
    "finetune_batch_size": (16, "94 Adam steps an epoch: at 100, 15 steps barely moved it"),
    "num_workers": (0, "the images are in memory; workers would compete for the cores"),
    "cpu": (True, "one process, batch 16: DDP would split it into tiny BatchNorm batches"),
    "workdir": ("demo", "every output under ./demo"),
}


def _demo_doc() -> str:
    """demo's --help text; its list of changed defaults is made from DEMO."""
    def flag(name: str, value: Any) -> str:
        opt = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            return opt if value else "--no-" + opt[2:]
        return f"{opt} {value}"

    rows = "\n".join(f"      {flag(k, v):<26}{why}" for k, (v, why) in DEMO.items())
    return f"""Network slimming you can see, in about 70 seconds on 2 CPU cores.

    The whole study of `pipeline` (sparse training -> prune at 50% and 90% -> fine-tune each
    -> comparison figure and report.md) on the built-in synthetic dataset, with defaults
    sized for a short run: after sparse training most BatchNorm |γ| sit near zero, apart
    from the rest (plots/model_prune_90_gamma.png), so the thresholds remove channels the
    network no longer uses. It ends by printing where its checkpoints, figures and report
    are. Every option can be overridden.

    Defaults that differ from pipeline's:

    \b
{rows}"""


@dataclass(frozen=True)
class Command:
    """A run command: its help text, its options (RunConfig fields, in --help order), the
    defaults it overrides, what it runs (its own name unless said) and its arguments."""

    name: str
    doc: str
    fields: tuple[str, ...]
    defaults: dict[str, Any] = field(default_factory=dict)
    runs: str = ""
    positional: tuple[str, ...] = ()

    @property
    def command(self) -> str:
        return self.runs or self.name


# finetune, prune and evaluate read these from the input checkpoint's saved settings when the
# command line leaves them out (None): a checkpoint trained on the synthetic set at 16 px is
# fine-tuned and measured on that, not on CIFAR (trainer.config.derived.with_data_defaults).
FROM_CHECKPOINT: dict[str, Any] = {name: None for name in INHERITED}

COMMANDS: tuple[Command, ...] = (
    Command(
        "train",
        f"""Train a model from scratch or --init (with --sparsity: network slimming).

    --sparsity λ adds the L1 penalty on BatchNorm γ (the paper: 1e-4, 1e-5 for ResNet-164 and
    DenseNet-40). Defaults follow the network-slimming CIFAR recipe (SGD momentum 0.9, wd 1e-4,
    lr 0.1, ÷10 at 50%/75%, 160 epochs, batch 64); --arch picks the rest (the lab's ResNets
    need a 1-epoch warm-up at lr 0.1):

    \b
{recipes_text()}

    With --init, the architecture is the file's. Writes checkpoints/model_sparse.pth (λ > 0)
    or checkpoints/model.pth. With --scratch-from a pruned file, its architecture is trained
    from a fresh initialisation, with this recipe and no sparsity (Scratch-E; --scratch B: the
    epochs times the MACs saved); writes <file stem>_scratchE.pth (or B) beside it.""",
            ("arch", "init", "scratch_from", "scratch", "gamma_init", *OPTIM, *RUN, *DATA,
             *DEVICE),
            TRAIN_RECIPE | ARCH_RECIPE),
    Command("prune", """Prune the channels whose BatchNorm |γ| is below one global threshold.

    Threshold = the |γ| at position ⌊N·ratio⌋ of all N sorted channels. --criterion scores
    the channels another way (filter norms, random, Taylor); --allocation uniform removes
    ⌊ratio·C⌋ channels of every pruned layer instead. The accuracy right after pruning is
    measured after re-estimating the BatchNorm statistics on --bn-recalibrate training
    batches. Writes checkpoints/model_prune.pth and plots/<output stem>_gamma.png.""",
            ("checkpoint", "arch", "output", "overwrite", *PRUNE, "batch_size", *DATA,
             *DEVICE),
            {"checkpoint": str(CHECKPOINTS / SPARSE), "batch_size": 100, **FROM_CHECKPOINT}),
    Command("finetune", """Fine-tune a pruned checkpoint with the lab recipe; keep the best epoch.

    Adam, lr 1e-3, ÷10 at 50%/75% of the epochs, FP32 forward. Writes the best checkpoint,
    its curves, a metrics CSV and a resume state.""",
            ("checkpoint", "arch", *OPTIM, *KD, *RUN, *DATA, *DEVICE),
            dict(FINETUNE_RECIPE, checkpoint=str(CHECKPOINTS / PRUNED), **FROM_CHECKPOINT)),
    Command("evaluate", """Test loss and accuracy of a checkpoint on the chosen dataset.""",
            ("arch", "batch_size", "json", *DATA, *DEVICE), {"batch_size": 100, **FROM_CHECKPOINT},
            positional=("checkpoint",)),
    Command(
        "pipeline",
        """The whole study: sparse training, prune at each ratio, fine-tune, compare.

    Outputs under --workdir: checkpoints/, plots/ (curves, γ histograms, comparison) and
    report.md.""",
            (*PIPELINE, *DATA, *DEVICE), PIPELINE_DEFAULTS),
    Command(
        "sweep",
        """A grid of studies: pipeline over comma-separated values of chosen settings.

    Give any of --sparsity, --train-lr, --finetune-lr, --kd-alpha, --kd-temperature, --seed,
    --gamma-init, --train-epochs, --finetune-epochs a list (e.g. --sparsity 1e-5,1e-4 --seed
    0,1): every combination (a point) is a study of its own in <workdir>/<point>/ (e.g.
    sparsity1e-05_seed0), run on the pool of jobs (--jobs, --gpus-per-job; --slurm FILE
    writes them as SLURM arrays). Points that differ only in the fine-tunes' settings share
    one sparse stage. Ends with <workdir>/sweep.md: every point's targets, params, MACs and
    accuracy, and plots/sweep.png, accuracy against params per point.""",
        (*PIPELINE, *DATA, *DEVICE), PIPELINE_DEFAULTS, runs="sweep"),
    Command("demo", _demo_doc(), (*PIPELINE, *DATA, *DEVICE),
            {**PIPELINE_DEFAULTS, **{k: v for k, (v, _) in DEMO.items()}}, runs="pipeline"),
)

# Where one option's meaning depends on the command.
HELP_BY_COMMAND: dict[tuple[str, str], str] = {
    ("train", "output"): f"Best checkpoint (default {CHECKPOINTS / SPARSE} with --sparsity > 0, "
                         f"else {CHECKPOINTS / DENSE}).",
    ("prune", "output"): f"Pruned checkpoint (default {CHECKPOINTS / PRUNED}).",
    ("finetune", "output"): "Best checkpoint (default <checkpoint stem>_finetune.pth beside the "
                            "input: model_prune.pth -> model_prune_finetune.pth).",
    ("finetune", "plot"): f"Curves figure (default {PLOTS / LAB_CURVES} for {PRUNED}, else "
                          f"{PLOTS}/<output stem>.png).",
    ("train", "plot"): f"Curves figure (default {PLOTS}/<output stem>.png).",
    ("evaluate", "checkpoint"): "Checkpoint (.pth) to evaluate.",
    **{(c, "scratch"): f"Also train each target's pruned architecture from scratch, beside "
                       f"its fine-tune: {' or '.join(SCRATCH)} (train --scratch-from: E = "
                       "--train-epochs, B = those times the MACs saved; the sparse stage's "
                       "recipe without sparsity; default: none)." for c in ("pipeline", "demo")},
    ("prune", "overwrite"): "Replace a file already at --output (without it prune refuses).",
    **{(c, "overwrite"): "Redo a study whose --workdir holds an earlier study's checkpoints "
                         "(without it such a run is refused; --resume reuses them)."
       for c in ("pipeline", "demo")},
    **{(c, name): f"{option_help(name)} (default: the input checkpoint's, else "
                  f"{getattr(RunConfig(), name)})"
       for c in ("prune", "finetune", "evaluate") for name in INHERITED},
    **{(c, "arch"): "Architecture of an input file that names none, e.g. the network-slimming "
                    "code's (default: what its keys show, else the lab's resnet50); for a file "
                    "of your own model, its module.path:factory (your code is imported only "
                    "when you name it)."
       for c in ("prune", "finetune", "evaluate")},
    **{(c, "arch"): f"Architecture to build: {arch_choices()} (default: {DEFAULT_ARCH}, the "
                    "lab's)."
       for c in ("train", "pipeline")},
}

BY_NAME = {c.name: c for c in COMMANDS}


def accepted(command: str) -> tuple[frozenset[str] | None, tuple[str, ...]]:
    """(options, positional arguments) that ``python -m trainer <command>`` accepts; the
    launcher passes a run on with exactly these. Unknown command: every field, none positional."""
    spec = BY_NAME.get(command)
    if spec is None:
        return None, ()
    return frozenset(spec.fields), spec.positional


def default_of(spec: Command, name: str) -> Any:
    """The default an option shows on the command line (``ratios`` as '0.5,0.9')."""
    value = spec.defaults.get(name, getattr(RunConfig(), name))
    if name == "ratios" and not isinstance(value, str):
        value = ",".join(f"{r:g}" for r in value)
    if name == "targets" and not isinstance(value, str):
        value = ",".join(str(t) for t in value) or None
    if name in ("criteria", "allocations") and not isinstance(value, str):
        value = ",".join(value)
    return value


def config_from_options(command: str, values: dict[str, Any]) -> RunConfig:
    """RunConfig from parsed option values (``ratios`` arrives as '0.5,0.9', budgets as
    '4M')."""
    values = dict(values)
    if isinstance(values.get("ratios"), str):
        try:
            values["ratios"] = tuple(float(r) for r in values["ratios"].split(",") if r.strip())
        except ValueError:
            raise ParamError.value("ratios", values["ratios"], " is not a comma-separated list of "
                                   "numbers; e.g. {ratios} 0.5,0.9", quote=True) from None
    for key in ("target_params", "target_macs"):
        if isinstance(values.get(key), str):
            values[key] = parse_count(values[key], key)
    if isinstance(values.get("targets"), str):
        values["targets"] = tuple(parse_count(t, "targets")
                                  for t in values["targets"].split(",") if t.strip())
    elif values.get("targets") is None and "targets" in values:
        values["targets"] = ()
    for key in ("criteria", "allocations"):  # checked later, by name (checks.RULES)
        if isinstance(values.get(key), str):
            values[key] = tuple(v.strip() for v in values[key].split(",") if v.strip())
    if command == "sweep":  # its number settings arrive as text: lists of values
        from trainer.config.sweep import read_grid

        values, grid = read_grid(values)
        values["grid"] = grid
    return RunConfig(command=command, **values)

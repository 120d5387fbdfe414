"""Every run command's options, declared once: read by ``trainer.cli`` to build the Typer
commands and by the launcher to pass a run on to ``python -m trainer`` (pure Python).

An option's name is its RunConfig field with ``_`` -> ``-`` (booleans as ``--x/--no-x``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trainer.config import (
    DATASETS,
    FINETUNE_RECIPE,
    LOADERS,
    MIXED_PRECISIONS,
    MODES,
    OPTIMIZERS,
    SCOPES,
    SPARSITY,
    TRAIN_RECIPE,
    RunConfig,
)
from trainer.errors import UserError
from trainer.paths import CHECKPOINTS, DENSE, LAB_CURVES, PLOTS, PRUNED, SPARSE


def _or(choices: tuple[str, ...]) -> str:
    return ", ".join(choices[:-1]) + " or " + choices[-1]


# field -> (type, help). Defaults come from RunConfig unless a command overrides them.
OPTIONS: dict[str, tuple[Any, str]] = {
    # data
    "dataset": (str, (f"Dataset: {_or(DATASETS)}. imagefolder reads --data-dir/train|val/"
                      "<class>/*; synthetic is built in (offline).")),
    "data_dir": (str, "Folder holding (or receiving) the dataset files."),
    "download": (bool, "Download CIFAR into --data-dir when it is missing."),
    "image_size": (int, "Image side in pixels (imagefolder images are resized to it)."),
    "synthetic_train": (int, "Images in the synthetic train split."),
    "synthetic_test": (int, "Images in the synthetic test split."),
    "num_workers": (int, "DataLoader worker processes per rank (torch loader)."),
    "loader": (str, (f"Training data loader: {_or(LOADERS)}. auto = gpu on CUDA, else torch; "
                     "gpu keeps the whole dataset on the device and augments there.")),
    "limit_batches": (int | None, "Cap on training batches per epoch (smoke runs; default: "
                                  "the whole epoch)."),
    # files
    "checkpoint": (str | None, "Input checkpoint (.pth)."),
    "init": (str | None, "Start from this checkpoint's weights instead of from scratch "
                         "(default: from scratch)."),
    "gamma_init": (float, "From scratch: every BatchNorm γ starts here (each block's bn3 at 0); "
                          "the network-slimming code uses 0.5."),
    "output": (str | None, "Best checkpoint written here (default depends on the command)."),
    "plot": (str | None, "Curves figure (default plots/<output stem>.png)."),
    # optimisation
    "epochs": (int, "Epochs to run."),
    "batch_size": (int, "GLOBAL batch size: split across DDP processes, split across GPUs by DP."),
    "lr": (float, "Base learning rate (divided by 10 at 50% and 75% of the epochs)."),
    "optimizer": (str, f"Optimizer: {_or(OPTIMIZERS)} (sgd with momentum)."),
    "momentum": (float, "SGD momentum."),
    "weight_decay": (float, "Weight decay (L2)."),
    "warmup_epochs": (float, "Linear LR warm-up length in epochs (fractions allowed)."),
    "sparsity": (float, "L1 penalty λ on BatchNorm γ (network slimming uses 1e-4; 0 = off)."),
    # pruning
    "ratio": (float | None, "Fraction of channels to prune, in (0, 1)."),
    "ratios": (str, "Comma-separated prune ratios, each in (0, 1)."),
    "scope": (str, (f"γ values that set the threshold: {_or(SCOPES)}. all = every BatchNorm "
                    "(the reference rule), prunable = bn1/bn2 only.")),
    "min_channels": (int, "Fewest channels any pruned layer keeps."),
    "eval": (bool, "Measure test accuracy before and right after pruning."),
    # pipeline
    "train_epochs": (int, "Epochs of sparse training."),
    "finetune_epochs": (int, "Epochs of each fine-tune."),
    "train_lr": (float, "SGD LR of the sparse training stage."),
    "finetune_lr": (float, "Adam LR of the fine-tune stages."),
    "finetune_batch_size": (int, "GLOBAL batch of the fine-tune stages (the lab's 100)."),
    "workdir": (str, "Outputs go to <workdir>/checkpoints and <workdir>/plots."),
    # device / process
    "seed": (int, "Random seed (same initial model on every rank; per-rank augmentation)."),
    "cpu": (bool, "Run on CPU (with --gpus N --mode ddp: N gloo processes)."),
    "debug": (bool, "In-process, num_workers=0, anomaly detection, print resolved settings."),
    "mode": (str, (f"Multi-GPU mode: {_or(MODES)}. ddp = one process per GPU (faster); dp = "
                   "one process, nn.DataParallel, FP32 only, no --compile.")),
    "mixed_precision": (str, (f"{_or(MIXED_PRECISIONS)} (no = FP32). FP32 is the default: half "
                              "precision crashed in cublasLtMatmul on multi-GPU in the lab.")),
    "tf32": (bool, ("Allow TF32 convolutions (PyTorch default); --no-tf32 = strict IEEE FP32 "
                    "matmul and conv.")),
    "channels_last": (bool, "channels_last memory format on CUDA."),
    "cudnn_benchmark": (bool, "cudnn.benchmark autotuning on CUDA."),
    "compile": (bool, ("torch.compile the model (the compile time, spent in the first "
                       "step, gets its own line and is left out of img/s).")),
    "log_with": (str | None, "Accelerate tracker, e.g. tensorboard (must be installed; "
                             "default: none)."),
    "dist_timeout": (int, "Seconds a collective may wait before the job fails (no hangs)."),
    "resume": (bool, "Continue from the .last.pth resume state beside --output."),
    "force_resume": (bool, "Resume even if result-changing settings differ."),
    # launcher
    "gpus": (int | None, "Processes/GPUs to use (default: every visible GPU)."),
    "gpu_ids": (str | None, "Comma-separated GPU ids to use, e.g. 0,2."),
    "accelerate_config": (str | None, "Use this Accelerate config YAML instead of writing one."),
    "dry_run": (bool, "Print the accelerate launch command and config YAML; run nothing."),
    "num_machines": (int, "Machines in a multi-node job."),
    "machine_rank": (int, "This machine's rank in a multi-node job (0 = main)."),
    "main_process_ip": (str | None, "IP of the machine-rank-0 node (multi-node)."),
    "main_process_port": (int, "Port of the main process (multi-node)."),
    "json": (bool, "Print one JSON object instead of a table."),
}

DATA = ["dataset", "data_dir", "download", "image_size", "synthetic_train", "synthetic_test",
        "num_workers", "loader", "limit_batches"]
DEVICE = ["seed", "cpu", "debug", "mode", "mixed_precision", "tf32", "channels_last",
          "cudnn_benchmark", "compile", "dist_timeout", "gpus", "gpu_ids", "accelerate_config",
          "dry_run", "num_machines", "machine_rank", "main_process_ip", "main_process_port"]
OPTIM = ["epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "warmup_epochs",
         "sparsity"]
RUN = ["output", "plot", "log_with", "resume", "force_resume"]
PRUNE = ["ratio", "scope", "min_channels", "eval"]
PIPELINE = ["train_epochs", "finetune_epochs", "sparsity", "ratios", "train_lr", "finetune_lr",
            "finetune_batch_size", "batch_size", "warmup_epochs", "gamma_init", "workdir",
            "scope", "min_channels", "eval", "log_with", "resume", "force_resume"]


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


COMMANDS: tuple[Command, ...] = (
    Command(
        "train",
        """Train a ResNet-50 from scratch or --init (with --sparsity: network slimming).

    --sparsity λ adds the L1 penalty on BatchNorm γ (the paper uses 1e-4). Defaults follow the
    network-slimming CIFAR recipe (SGD momentum 0.9, wd 1e-4, lr 0.1,
    ÷10 at 50%/75%) plus a 1-epoch linear warm-up, without which this ResNet-50 diverges.
    Writes checkpoints/model_sparse.pth (λ > 0) or checkpoints/model.pth.""",
            ("init", "gamma_init", *OPTIM, *RUN, *DATA, *DEVICE), TRAIN_RECIPE),
    Command("prune", """Prune the channels whose BatchNorm |γ| is below one global threshold.

    Threshold = the |γ| at position ⌊N·ratio⌋ of all N sorted channels. Writes
    checkpoints/model_prune.pth and plots/<output stem>_gamma.png.""",
            ("checkpoint", "output", *PRUNE, "batch_size", *DATA, *DEVICE),
            {"checkpoint": str(CHECKPOINTS / SPARSE), "batch_size": 100}),
    Command("finetune", """Fine-tune a pruned checkpoint with the lab recipe; keep the best epoch.

    Adam, lr 1e-3, ÷10 at 50%/75% of the epochs, FP32 forward. Writes the best checkpoint,
    its curves, a metrics CSV and a resume state.""",
            ("checkpoint", *OPTIM, *RUN, *DATA, *DEVICE),
            dict(FINETUNE_RECIPE, checkpoint=str(CHECKPOINTS / PRUNED))),
    Command("evaluate", """Test loss and accuracy of a checkpoint on the chosen dataset.""",
            ("batch_size", "json", *DATA, *DEVICE), {"batch_size": 100},
            positional=("checkpoint",)),
    Command(
        "pipeline",
        """The whole study: sparse training, prune at each ratio, fine-tune, compare.

    Outputs under --workdir: checkpoints/, plots/ (curves, γ histograms, comparison) and
    report.md.""",
            (*PIPELINE, *DATA, *DEVICE),
            # scope prunable: a ratio is the fraction of bn1/bn2 channels removed, whatever
            # the never-pruned bn3 γ look like (zero-initialised, they sit below everything).
            {"sparsity": SPARSITY, "batch_size": TRAIN_RECIPE["batch_size"],
             "warmup_epochs": TRAIN_RECIPE["warmup_epochs"], "ratios": "0.5,0.9",
             "scope": "prunable"}),
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
    return value


def config_from_options(command: str, values: dict[str, Any]) -> RunConfig:
    """RunConfig from parsed option values (``ratios`` arrives as '0.5,0.9')."""
    values = dict(values)
    if isinstance(values.get("ratios"), str):
        try:
            values["ratios"] = tuple(float(r) for r in values["ratios"].split(",") if r.strip())
        except ValueError:
            raise UserError(f"--ratios {values['ratios']!r} is not a comma-separated list of "
                            "numbers; e.g. --ratios 0.5,0.9") from None
    return RunConfig(command=command, **values)

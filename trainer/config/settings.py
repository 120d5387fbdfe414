"""The facts a run is made of, in one place: the choice lists, the recipes, and ``RunConfig``,
the one dataclass that holds a run's settings.

Each setting is declared once, as a field: its name, type, default, ``--help`` text and kind.
The command line's options (``trainer.config.commands``), the launcher's worker argv and
what a checkpoint records all derive from these declarations (trainer.config.derived). A
setting's *kind* says what it is to a run:

- ``result``: changes the numbers the run produces; ``--resume`` with another value is refused;
- ``recorded``: saved with the run's files, but does not change its numbers (paths of outputs,
  speed switches, a study's own plan whose stages each record their own result settings);
- ``volatile``: left out of what is saved, so a resumed run's files equal an uninterrupted
  run's (``--resume`` itself, ``--debug``, worker counts, ``--json``);
- ``launcher``: only steers how processes start (``--gpus``, ``--dry-run``, ...); never passed
  on to a worker.

Pure Python: the launcher reads this module without importing torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from trainer.config.archs import arch_choices

# ---------------------------------------------------------------- choice lists

RUN_COMMANDS = ("train", "prune", "finetune", "evaluate", "pipeline")
DATASETS = ("cifar10", "cifar100", "imagefolder", "synthetic")
AUGMENTS = ("auto", "cifar", "imagenet", "none")  # trainer.data.common.augment_of
LOADERS = ("auto", "torch", "gpu")  # auto = gpu on CUDA (in-memory datasets), else torch
LOADER_KINDS = ("torch", "gpu")  # what "auto" resolves to
OPTIMIZERS = ("sgd", "adam")
MODES = ("ddp", "dp")
MIXED_PRECISIONS = ("no", "bf16", "fp16")
SCOPES = ("all", "prunable")
BUDGET_KINDS = ("params", "macs")
CRITERIA = ("bn", "l1", "l2", "random", "taylor")  # channel criteria (trainer.prune.criteria)
ALLOCATIONS = ("global", "uniform")
SCRATCH = ("E", "B")  # Scratch-E / Scratch-B (Liu et al., ICLR 2019)
# prune --bn-recalibrate: batches of adaptive BN (chosen by measurement: BENCHMARKS.md)
BN_RECALIBRATE = 20
RUNTIMES = ("torch", "onnxruntime")  # what profile/compare --latency time
DEVICES = ("cpu", "cuda")  # where they time it

# ---------------------------------------------------------------- recipes

# Sparse training: the network-slimming CIFAR recipe (SGD momentum 0.9, wd 1e-4, lr 0.1,
# ÷10 at 50%/75%, 160 epochs, batch 64) plus a 1-epoch warm-up, without which the lab's
# ResNet-50 diverges at lr 0.1.
TRAIN_RECIPE: dict[str, Any] = {"epochs": 160, "batch_size": 64, "lr": 0.1, "optimizer": "sgd",
                                "weight_decay": 1e-4, "warmup_epochs": 1.0, "sparsity": 0.0}
# Fine-tuning: the lab's (Adam 1e-3, ÷10 at 50%/75%, 20 epochs, batch 100, FP32).
FINETUNE_RECIPE: dict[str, Any] = {"epochs": 20, "batch_size": 100, "lr": 1e-3,
                                   "optimizer": "adam", "weight_decay": 0.0,
                                   "warmup_epochs": 0.0, "sparsity": 0.0}

# ---------------------------------------------------------------- declaring a setting

KINDS = ("result", "recorded", "volatile", "launcher")
PRUNING = ("prune",)  # the commands the pruning settings change the numbers of


def _or(choices: tuple[str, ...]) -> str:
    return ", ".join(choices[:-1]) + " or " + choices[-1]


def setting(default: Any, help: str, kind: str, *, cli: type | None = None,  # noqa: A002
            option: bool = True, affects: tuple[str, ...] | None = None) -> Any:
    """A RunConfig field: its default, ``--help`` text and kind (see the module docstring).

    ``cli``: the type the command line reads when it differs from the field's (a budget
    arrives as text such as '4M'); ``option=False``: a field no command line sets;
    ``affects``: the only commands whose numbers a result setting changes (None: all).
    """
    return field(default=default, metadata={"help": help, "kind": kind, "cli": cli,
                                            "option": option, "affects": affects})


def arch_help() -> str:
    return f"Architecture: {arch_choices()}; --help of train lists what each prunes."


@dataclass
class RunConfig:
    """Every setting of a train / prune / finetune / evaluate / pipeline run."""

    command: str = setting("finetune", "The command this run is.", "result", option=False)
    # data
    dataset: str = setting("cifar10", f"Dataset: {_or(DATASETS)}. imagefolder reads --data-dir/"
                           "train|val/<class>/*; synthetic is built in (offline).", "result")
    data_dir: str = setting("./data", "Folder holding (or receiving) the dataset files.",
                            "result")
    download: bool = setting(True, "Download CIFAR into --data-dir when it is missing.",
                             "recorded")
    image_size: int = setting(32, "Image side in pixels (imagefolder images are resized to it).",
                              "result")
    augment: str = setting("auto", f"Transforms: {_or(AUGMENTS)}. auto = imagenet for "
                           "imagefolder at --image-size 64 or more, else cifar. imagenet: train "
                           "RandomResizedCrop + flip, eval resize the short side to size/0.875 "
                           "+ centre crop, ImageNet mean/std; cifar: pad-and-crop + flip; none: "
                           "train as eval.", "result")
    synthetic_train: int = setting(5000, "Images in the synthetic train split.", "result")
    synthetic_test: int = setting(1000, "Images in the synthetic test split.", "result")
    num_workers: int = setting(2, "DataLoader worker processes per rank (torch loader).",
                               "volatile")
    loader: str = setting("auto", f"Training data loader: {_or(LOADERS)}. auto = gpu on CUDA, "
                          "else torch; gpu keeps the whole dataset on the device and augments "
                          "there.", "result")
    limit_batches: int | None = setting(None, "Cap on training batches per epoch (smoke runs; "
                                        "default: the whole epoch).", "result")
    # model / files
    arch: str | None = setting(None, "", "result")  # help: arch_help() (the registry's names)
    checkpoint: str | None = setting(None, "Input checkpoint (.pth).", "result")
    init: str | None = setting(None, "Start from this checkpoint's weights instead of from "
                               "scratch (default: from scratch).", "result")
    scratch_from: str | None = setting(None, "Train the architecture (widths) of this pruned "
                                       "checkpoint from a fresh initialisation, without "
                                       "sparsity: the baseline of Liu et al., ICLR 2019.",
                                       "result", affects=("train",))
    scratch: str | None = setting(None, f"With --scratch-from: {_or(SCRATCH)}. E = --epochs "
                                  "epochs (Scratch-E); B = ⌊epochs × MACs(unpruned) / "
                                  "MACs(pruned)⌋, the same compute (Scratch-B); default E.",
                                  "result", affects=("train",))
    gamma_init: float = setting(1.0, "From scratch: every BatchNorm γ starts here (the lab's "
                                "ResNets: each block's last BN at 0; default: the --arch "
                                "recipe); the network-slimming code uses 0.5.", "result")
    output: str | None = setting(None, "Best checkpoint written here (default depends on the "
                                 "command).", "recorded")
    plot: str | None = setting(None, "Curves figure (default plots/<output stem>.png).",
                               "recorded")
    # optimisation (defaults: the fine-tune recipe)
    epochs: int = setting(FINETUNE_RECIPE["epochs"], "Epochs to run.", "result")
    batch_size: int = setting(FINETUNE_RECIPE["batch_size"], "GLOBAL batch size: split across "
                              "DDP processes, split across GPUs by DP.", "result")
    lr: float = setting(FINETUNE_RECIPE["lr"], "Base learning rate (divided by 10 at 50% and "
                        "75% of the epochs).", "result")
    optimizer: str = setting(FINETUNE_RECIPE["optimizer"], f"Optimizer: {_or(OPTIMIZERS)} (sgd "
                             "with momentum).", "result")
    momentum: float = setting(0.9, "SGD momentum.", "result")
    weight_decay: float = setting(FINETUNE_RECIPE["weight_decay"], "Weight decay (L2).",
                                  "result")
    warmup_epochs: float = setting(FINETUNE_RECIPE["warmup_epochs"], "Linear LR warm-up length "
                                   "in epochs (fractions allowed; train/pipeline default: the "
                                   "--arch recipe).", "result")
    sparsity: float = setting(0.0, "L1 penalty λ on BatchNorm γ (network slimming: 1e-4, 1e-5 "
                              "for ResNet-164/DenseNet-40; 0 = off; pipeline default: the --arch "
                              "recipe).", "result")
    teacher: str | None = setting(None, "Distil from this checkpoint while fine-tuning (usually "
                                  "the unpruned sparse model); same classes (default: no "
                                  "teacher).", "result")
    kd_alpha: float = setting(0.9, "Weight α of the teacher's term: α·T²·KL(teacher‖student) + "
                              "(1−α)·CE.", "result")
    kd_temperature: float = setting(4.0, "Temperature T of the distillation softmax.", "result")
    # pruning
    ratio: float | None = setting(None, "Fraction of channels to prune, in (0, 1).", "result",
                                  affects=PRUNING)
    target_params: int | None = setting(None, "Instead of --ratio: prune to at most this many "
                                        "params (4M, 4e6 or 4000000; K/M/G suffixes): the "
                                        "least-pruned model within it.", "result", cli=str,
                                        affects=PRUNING)
    target_macs: int | None = setting(None, "Instead of --ratio: prune to at most this many MACs "
                                      "(thop, at --image-size), e.g. 100M.", "result", cli=str,
                                      affects=PRUNING)
    round_to: int = setting(1, "Every pruned layer keeps a multiple of this many channels (at "
                            "least that many; GPUs run 37 no faster than 64); 1 = off.", "result",
                            affects=PRUNING)
    ratios: tuple[float, ...] = setting((0.5, 0.9), "Comma-separated prune ratios, each in "
                                        "(0, 1).", "recorded", cli=str)
    targets: tuple[int, ...] = setting((), "Instead of --ratios: comma-separated budgets (e.g. "
                                       "4M,2M) of --target-kind; files are named by the budget "
                                       "(model_prune_4M.pth).", "recorded", cli=str)
    target_kind: str = setting("params", "What --targets count: params or macs.", "recorded")
    criteria: tuple[str, ...] = setting(("bn",), f"Comma-separated channel criteria "
                                        f"({_or(CRITERIA)}; see prune --criterion): a chain of "
                                        "prune -> fine-tune per criterion and target; files of "
                                        "criteria other than bn are named by it "
                                        "(model_prune_l1_50.pth).", "recorded", cli=str)
    allocations: tuple[str, ...] = setting(("global",), f"Comma-separated allocations "
                                           f"({_or(ALLOCATIONS)}; see prune --allocation), "
                                           "each a chain per criterion and target "
                                           "(model_prune_bn_uniform_50.pth).", "recorded",
                                           cli=str)
    passes: int = setting(1, "Reach each ratio/budget in this many prune -> fine-tune rounds "
                          "(the paper's multi-pass scheme); each round's files are kept.",
                          "recorded")
    kd: bool = setting(False, "Every fine-tune distils from the sparse model (--teacher "
                       "checkpoints/model_sparse.pth).", "recorded")
    scope: str = setting("all", f"γ values that set the threshold: {_or(SCOPES)}. all = every "
                         "BatchNorm (the reference rule), prunable = bn1/bn2 only.", "result",
                         affects=PRUNING)
    min_channels: int = setting(1, "Fewest channels any pruned layer keeps.", "result",
                                affects=PRUNING)
    criterion: str = setting("bn", f"Channel criterion: {_or(CRITERIA)}. bn = |γ| (network "
                             "slimming); l1/l2 = norm of the filter making the channel (Li et "
                             "al. 2017); random (seeded by --seed); taylor = |activation × "
                             "gradient| on --taylor-batches training batches (Molchanov et al.). "
                             "l1, l2 and taylor are divided by each layer's mean, so that one "
                             "threshold fits all layers.", "result", affects=PRUNING)
    allocation: str = setting("global", f"{_or(ALLOCATIONS)}. global = one threshold across "
                              "the model; uniform = remove ⌊ratio·C⌋ of the C channels of every "
                              "pruned layer (with a budget: the least-pruned such model within "
                              "it).", "result", affects=PRUNING)
    taylor_batches: int = setting(10, "Training batches the taylor criterion averages over.",
                                  "result", affects=PRUNING)
    bn_recalibrate: int = setting(BN_RECALIBRATE, "Re-estimate the pruned model's BatchNorm "
                                  "statistics on this many training batches (cumulative "
                                  "average; adaptive BN, Li et al. 2020) before measuring its "
                                  "accuracy, and keep them in the pruned file; 0 = off (the "
                                  "unpruned network's statistics).", "result", affects=PRUNING)
    eval: bool = setting(True, "Measure test accuracy before and right after pruning.",
                         "recorded")
    # pipeline
    train_epochs: int = setting(20, "Epochs of sparse training.", "recorded")
    finetune_epochs: int = setting(10, "Epochs of each fine-tune.", "recorded")
    finetune_batch_size: int = setting(FINETUNE_RECIPE["batch_size"], "GLOBAL batch of the "
                                       "fine-tune stages (the lab's 100).", "recorded")
    train_lr: float = setting(TRAIN_RECIPE["lr"], "SGD LR of the sparse training stage.",
                              "recorded")
    finetune_lr: float = setting(FINETUNE_RECIPE["lr"], "Adam LR of the fine-tune stages.",
                                 "recorded")
    workdir: str = setting(".", "Outputs go to <workdir>/checkpoints and <workdir>/plots.",
                           "recorded")
    job: str | None = setting(None, "Run one job of the study only: sparse, a target's chain "
                              "(its tag, e.g. 50 or 4M) or report; what --jobs, --gpus-per-job "
                              "and --slurm start (default: the whole study).", "volatile")
    # device / process
    seed: int = setting(0, "Random seed (same initial model on every rank; per-rank "
                        "augmentation).", "result")
    cpu: bool = setting(False, "Run on CPU (with --gpus N --mode ddp: N gloo processes).",
                        "recorded")
    threads: int | None = setting(None, "CPU threads of each process (default: the cores not "
                                  "busy at start, split over the processes; OMP_NUM_THREADS "
                                  "if set).", "volatile")
    debug: bool = setting(False, "In-process, num_workers=0, anomaly detection, print resolved "
                          "settings.", "volatile")
    mode: str = setting("ddp", f"Multi-GPU mode: {_or(MODES)}. ddp = one process per GPU "
                        "(faster); dp = one process, nn.DataParallel, FP32 only, no --compile.",
                        "result")
    mixed_precision: str = setting("no", f"{_or(MIXED_PRECISIONS)} (no = FP32). FP32 is the "
                                   "default: half precision crashed in cublasLtMatmul on "
                                   "multi-GPU in the lab.", "result")
    tf32: bool = setting(True, "Allow TF32 convolutions (PyTorch default); --no-tf32 = strict "
                         "IEEE FP32 matmul and conv.", "recorded")
    channels_last: bool = setting(True, "channels_last memory format on CUDA.", "recorded")
    cudnn_benchmark: bool = setting(True, "cudnn.benchmark autotuning on CUDA.", "recorded")
    compile: bool = setting(False, "torch.compile the model (the compile time, spent in the "
                            "first step, gets its own line and is left out of img/s).",
                            "recorded")
    sync_bn: bool = setting(False, "SyncBatchNorm across the processes of a multi-GPU job "
                            "(small per-GPU batches give noisy BN statistics, and slimming reads "
                            "γ); needs CUDA.", "result")
    log_with: str | None = setting(None, "Accelerate tracker, e.g. tensorboard (must be "
                                   "installed; default: none).", "volatile")
    dist_timeout: int = setting(300, "Seconds a collective may wait before the job fails (no "
                                "hangs).", "recorded")
    resume: bool = setting(False, "Continue from the .last.pth resume state beside --output.",
                           "volatile")
    force_resume: bool = setting(False, "Resume even if result-changing settings differ.",
                                 "volatile")
    overwrite: bool = setting(False, "Replace what an earlier run left at the outputs (its "
                              "best checkpoint and resume state; pipeline: its --workdir); "
                              "without it such a run is refused.", "volatile")
    json: bool = setting(False, "Print one JSON object instead of a table.", "volatile")
    # launcher only
    gpus: int | None = setting(None, "Processes/GPUs to use (default: every visible GPU).",
                               "launcher")
    gpu_ids: str | None = setting(None, "Comma-separated GPU ids to use, e.g. 0,2.", "launcher")
    accelerate_config: str | None = setting(None, "Use this Accelerate config YAML instead of "
                                            "writing one.", "launcher")
    dry_run: bool = setting(False, "Print the accelerate launch command and config YAML; run "
                            "nothing.", "launcher")
    num_machines: int = setting(1, "Machines in a multi-node job.", "launcher")
    machine_rank: int = setting(0, "This machine's rank in a multi-node job (0 = main).",
                                "launcher")
    main_process_ip: str | None = setting(None, "IP of the machine-rank-0 node (multi-node).",
                                          "launcher")
    main_process_port: int = setting(29500, "Port of the main process (multi-node; on one "
                                     "machine a port other than 29500 is used as given, else "
                                     "a free one is picked).", "launcher")
    # many jobs (launch.pool): a study's independent jobs side by side
    jobs: int | None = setting(None, "Run the study's jobs side by side, at most this many at "
                               "once: after the sparse stage, each target's chain (prune -> "
                               "fine-tune, all its rounds) is a job, with its own log in "
                               "<workdir>/logs/; with --cpu the cores are split between them "
                               "(default: one after another in this process).", "launcher")
    gpus_per_job: int | None = setting(None, "GPUs of each job of the study (of --gpus or "
                                       "--gpu-ids, default every visible GPU): jobs run on "
                                       "disjoint GPU sets, each with its own rendezvous port; "
                                       "the rest wait in a queue.", "launcher")
    slurm: str | None = setting(None, "Write an sbatch script to this file instead of running: "
                                "SLURM job arrays with one task per job of the study (each the "
                                "same command with --resume), the report after them; submit it "
                                "with: bash FILE.", "launcher")
    # sweep (trainer.config.sweep): ((setting, (value, ...)), ...) of the grid
    grid: tuple = setting((), "The sweep's settings and their values.", "launcher",
                          option=False)
    # filled in by the worker: total processes of the job
    num_processes: int = setting(1, "Processes of the job.", "result", option=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (safe for ``weights_only`` checkpoints and JSON)."""
        out = dataclasses.asdict(self)
        for key in TUPLES:
            out[key] = list(getattr(self, key))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        for key in TUPLES:
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


# lists of RunConfig: JSON and checkpoints hold them as lists
TUPLES = ("ratios", "targets", "criteria", "allocations")

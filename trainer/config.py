"""The facts a run is made of, in one place: the choice lists, the recipes, and the one
dataclass that holds a run's settings (the CLI fills it; the run saves it resolved).

Pure Python: the launcher reads this module without importing torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# ---------------------------------------------------------------- choice lists

RUN_COMMANDS = ("train", "prune", "finetune", "evaluate", "pipeline")
DATASETS = ("cifar10", "cifar100", "imagefolder", "synthetic")
LOADERS = ("auto", "torch", "gpu")  # auto = gpu on CUDA (in-memory datasets), else torch
LOADER_KINDS = ("torch", "gpu")  # what "auto" resolves to
OPTIMIZERS = ("sgd", "adam")
MODES = ("ddp", "dp")
MIXED_PRECISIONS = ("no", "bf16", "fp16")
SCOPES = ("all", "prunable")
BUDGET_KINDS = ("params", "macs")
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

# Fields that only steer the launcher (how processes start), not what a worker computes.
LAUNCHER_FIELDS = frozenset({
    "gpus", "gpu_ids", "accelerate_config", "dry_run", "num_machines", "machine_rank",
    "main_process_ip", "main_process_port",
})

# Settings whose change alters the numbers a run produces; resuming with any of them
# different is refused (trainer.fit.resume_mismatch).
RESULT_FIELDS = ("command", "dataset", "data_dir", "image_size", "batch_size", "epochs", "lr",
                 "optimizer", "momentum", "weight_decay", "warmup_epochs", "sparsity", "ratio",
                 "seed", "limit_batches", "checkpoint", "init", "mode", "num_processes",
                 "mixed_precision", "loader", "synthetic_train", "synthetic_test", "gamma_init",
                 "arch", "target_params", "target_macs", "round_to", "teacher", "kd_alpha",
                 "kd_temperature", "sync_bn")

# Settings that do not change a run's numbers; left out of the saved config so a resumed
# run's checkpoint equals an uninterrupted run's.
VOLATILE_FIELDS = ("resume", "force_resume", "dry_run", "debug", "num_workers", "log_with",
                   "json")


@dataclass
class RunConfig:
    """Every setting of a train / prune / finetune / evaluate / pipeline run."""

    command: str = "finetune"
    # data
    dataset: str = "cifar10"
    data_dir: str = "./data"
    image_size: int = 32
    download: bool = True
    synthetic_train: int = 5000  # images in the synthetic train split
    synthetic_test: int = 1000
    num_workers: int = 2
    loader: str = "auto"
    limit_batches: int | None = None  # cap on training batches per epoch (smoke runs)
    # model / files
    arch: str | None = None  # train/pipeline: what to build (None: resnet50); else: the
    # architecture of an input file that names none (None: what its keys show)
    checkpoint: str | None = None  # input checkpoint (finetune/prune/evaluate)
    init: str | None = None  # train: start from this checkpoint's weights
    gamma_init: float = 1.0  # train from scratch: initial BatchNorm γ (bn3 of each block: 0)
    output: str | None = None
    plot: str | None = None
    # optimisation (defaults: the fine-tune recipe)
    epochs: int = FINETUNE_RECIPE["epochs"]
    batch_size: int = FINETUNE_RECIPE["batch_size"]  # global batch, split across processes
    lr: float = FINETUNE_RECIPE["lr"]
    optimizer: str = FINETUNE_RECIPE["optimizer"]
    momentum: float = 0.9
    weight_decay: float = FINETUNE_RECIPE["weight_decay"]
    warmup_epochs: float = FINETUNE_RECIPE["warmup_epochs"]  # linear LR warm-up, in epochs
    sparsity: float = 0.0  # λ of the L1 penalty on BatchNorm γ
    teacher: str | None = None  # finetune: distil from this checkpoint
    kd_alpha: float = 0.9  # weight of the distillation term (1 - α: cross-entropy)
    kd_temperature: float = 4.0
    # pruning
    ratio: float | None = None
    target_params: int | None = None  # prune to at most this many params (instead of ratio)
    target_macs: int | None = None  # ... or MACs, as thop counts them at image_size
    round_to: int = 1  # every pruned layer keeps a multiple of this many channels
    ratios: tuple[float, ...] = (0.5, 0.9)
    targets: tuple[int, ...] = ()  # pipeline: budgets instead of ratios
    target_kind: str = "params"  # what pipeline's targets count: params or macs
    passes: int = 1  # pipeline: prune -> fine-tune rounds to reach each ratio/budget
    kd: bool = False  # pipeline: every fine-tune distils from the sparse model
    scope: str = "all"
    min_channels: int = 1
    eval: bool = True
    # pipeline
    train_epochs: int = 20
    finetune_epochs: int = 10
    finetune_batch_size: int = FINETUNE_RECIPE["batch_size"]  # global batch of fine-tunes
    train_lr: float = TRAIN_RECIPE["lr"]  # SGD LR of the sparse training stage
    finetune_lr: float = FINETUNE_RECIPE["lr"]  # Adam LR of the fine-tune stages
    workdir: str = "."
    # device / process
    seed: int = 0
    cpu: bool = False
    debug: bool = False
    mode: str = "ddp"
    mixed_precision: str = "no"
    tf32: bool = True
    channels_last: bool = True
    cudnn_benchmark: bool = True
    compile: bool = False
    sync_bn: bool = False  # SyncBatchNorm over the processes of a multi-GPU job
    log_with: str | None = None
    dist_timeout: int = 300  # seconds a collective may wait before the job fails
    resume: bool = False
    force_resume: bool = False
    json: bool = False  # evaluate: print one JSON object
    # launcher only (see LAUNCHER_FIELDS)
    gpus: int | None = None
    gpu_ids: str | None = None
    accelerate_config: str | None = None
    dry_run: bool = False
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int = 29500
    # filled in by the worker: total processes of the job
    num_processes: int = field(default=1)

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (safe for ``weights_only`` checkpoints and JSON)."""
        out = dataclasses.asdict(self)
        out["ratios"], out["targets"] = list(self.ratios), list(self.targets)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        for key in ("ratios", "targets"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


def saved_config(cfg: RunConfig) -> dict[str, Any]:
    """The settings a checkpoint records: everything that shapes its numbers."""
    return {k: v for k, v in cfg.to_dict().items() if k not in VOLATILE_FIELDS}


def worker_fields() -> list[dataclasses.Field]:
    """Fields passed on to a launched worker as ``--name value`` options."""
    return [f for f in dataclasses.fields(RunConfig)
            if f.name not in LAUNCHER_FIELDS and f.name not in ("num_processes",)]

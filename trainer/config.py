"""One dataclass holds a run's settings; the CLI fills it and the run saves it resolved."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Fields that only steer the launcher (how processes start), not what a worker computes.
LAUNCHER_FIELDS = frozenset({
    "gpus", "gpu_ids", "accelerate_config", "dry_run", "num_machines", "machine_rank",
    "main_process_ip", "main_process_port",
})

# Settings whose change alters the numbers a run produces; resuming with any of them
# different is refused (see trainer.resume).
RESULT_FIELDS = ("command", "dataset", "data_dir", "image_size", "batch_size", "epochs", "lr",
                 "optimizer", "momentum", "weight_decay", "warmup_epochs", "sparsity", "ratio",
                 "seed", "limit_batches", "checkpoint", "init", "mode", "num_processes",
                 "mixed_precision", "loader", "synthetic_train", "synthetic_test")


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
    loader: str = "auto"  # auto = gpu on CUDA, torch elsewhere
    limit_batches: int | None = None  # cap on training batches per epoch (smoke runs)
    # model / files
    checkpoint: str | None = None  # input checkpoint (finetune/prune/evaluate)
    init: str | None = None  # train: start from this checkpoint's weights
    output: str | None = None
    plot: str | None = None
    # optimisation
    epochs: int = 20
    batch_size: int = 100  # global batch, split across processes
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup_epochs: float = 0.0  # linear LR warm-up, in epochs (fractions allowed)
    sparsity: float = 0.0  # lambda of the L1 penalty on BatchNorm gamma
    # pruning
    ratio: float | None = None
    ratios: tuple[float, ...] = (0.5, 0.9)
    scope: str = "all"
    min_channels: int = 1
    eval: bool = True
    # pipeline
    train_epochs: int = 20
    finetune_epochs: int = 10
    finetune_batch_size: int = 100  # pipeline: global batch of the fine-tune stages (lab: 100)
    train_lr: float = 0.1  # pipeline: SGD LR of the sparse training stage
    finetune_lr: float = 1e-3  # pipeline: Adam LR of the fine-tune stages
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
        out["ratios"] = list(self.ratios)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        if "ratios" in values:
            values["ratios"] = tuple(values["ratios"])
        return cls(**values)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


def worker_fields() -> list[dataclasses.Field]:
    """Fields passed on to a launched worker as ``--name value`` options."""
    return [f for f in dataclasses.fields(RunConfig)
            if f.name not in LAUNCHER_FIELDS and f.name not in ("num_processes",)]

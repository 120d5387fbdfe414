"""``bench``: how close the fine-tune loop runs to the speed of the model itself.

Measured in one run, on one device, with the same settings (FP32, TF32 / channels_last /
cudnn.benchmark / compile as configured):

* **model limit**: forward + backward + Adam step (the fine-tune recipe: lr 1e-3, no weight
  decay) on one batch already on the device; no data pipeline, no Accelerate, no checks;
* **loop**: the real fine-tune code path -- ``trainer.train.loop.train_one_epoch`` with a real
  Accelerator, ``prepare_model`` and ``make_train_loader`` -- over CIFAR-shaped synthetic
  images (``trainer.data.datasets.build_datasets("synthetic")``), once per loader kind;
* **inference**: eval-mode forward of the pruned and of the unpruned model.

Every figure is images/s: a warm-up round first (not timed; it holds cudnn autotuning and
torch.compile), then ``repeats`` timed rounds of ``steps`` batches, and the median. The
rounds of all measurements are interleaved (round 1 of each, then round 2 of each, ...), so
a change of machine load hits them alike and their ratios stay meaningful. On CUDA each
round is timed with CUDA events between two synchronisations.

Models: ``--checkpoint`` measures a real (pruned) checkpoint against the full-width model of
its arch with the same number of classes. ``--ratio R`` (default 0.9) builds the pruned model
without any file: a randomly initialised ``--arch`` model (default the lab's ResNet-50) whose
BatchNorm gammas are drawn from U(0, 1) with ``--seed``, pruned by ``trainer.prune.engine.prune``
at R. Random gammas prune every layer to about the same fraction, whereas a trained
network-slimming model keeps more of its early, high-resolution layers, so a real checkpoint
at the same ratio has more MACs and is slower: quote ``--checkpoint`` figures when one exists.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config.archs import DEFAULT_ARCH
from trainer.config.checks import check_ratio
from trainer.config.settings import LOADER_KINDS, RunConfig
from trainer.data.datasets import build_datasets
from trainer.errors import ConfigError
from trainer.files.checkpoint import build_model, load_checkpoint
from trainer.measure.profiling import Timer, profile_model
from trainer.models.build import new_model
from trainer.models.family import batchnorms
from trainer.prune.engine import prune
from trainer.train.loop import make_optimizer, train_one_epoch
from trainer.train.runtime import (
    channels_last,
    loader_kind,
    make_accelerator,
    prepare_model,
    training_loader,
)

DEFAULT_RATIO = 0.9
IMAGE_SIZE = 32  # CIFAR


# ---------------------------------------------------------------- models


def random_gamma_model(num_classes: int = 10, seed: int = 0,
                       arch: str = DEFAULT_ARCH) -> nn.Module:
    """A randomly initialised ``arch`` whose BatchNorm gammas are seeded U(0, 1) draws."""
    torch.manual_seed(seed)
    model = new_model(arch, num_classes)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, bn in batchnorms(model):
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=gen))
    return model


def bench_models(checkpoint: str | None = None, ratio: float | None = None, seed: int = 0,
                 arch: str = DEFAULT_ARCH) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """(pruned, unpruned, description) for ``--checkpoint`` or ``--ratio`` (see module doc)."""
    if checkpoint is not None and ratio is not None:
        raise ConfigError("give --checkpoint or --ratio, not both")
    if checkpoint is not None:
        ckpt = load_checkpoint(checkpoint)
        pruned = build_model(ckpt)
        torch.manual_seed(seed)
        unpruned = new_model(ckpt["arch"], ckpt["num_classes"])
        source = {"checkpoint": str(checkpoint), "ratio": ckpt.get("prune", {}).get("ratio")}
    else:
        ratio = check_ratio(DEFAULT_RATIO if ratio is None else ratio)
        unpruned = random_gamma_model(10, seed, arch)
        pruned = prune(unpruned, ratio).model
        source = {"checkpoint": None, "ratio": ratio, "gammas": f"U(0, 1), seed {seed}"}
    sizes = {name: profile_model(m, IMAGE_SIZE) for name, m in
             (("pruned", pruned), ("unpruned", unpruned))}
    info = {**source, "arch": pruned.arch, "num_classes": pruned.num_classes,
            **{f"{k}_{f}": sizes[k][f] for k in sizes for f in ("params", "macs")}}
    return pruned, unpruned, info


# ---------------------------------------------------------------- timing


@dataclass
class Case:
    """One measurement: ``run(round)`` processes ``images`` images; round 0 is the warm-up."""

    name: str
    run: Callable[[int], object]
    images: int


def measure(cases: list[Case], repeats: int, device: torch.device) -> dict[str, dict[str, Any]]:
    """Warm every case up once, then time ``repeats`` interleaved rounds of each.

    Returns name -> {"img_s" (median), "runs_img_s", "warmup_s"}.
    """
    out: dict[str, dict[str, Any]] = {}
    for case in cases:
        with Timer(device) as t:
            case.run(0)
        out[case.name] = {"img_s": 0.0, "runs_img_s": [], "warmup_s": t.seconds}
    for r in range(1, repeats + 1):
        for case in cases:
            with Timer(device) as t:
                case.run(r)
            out[case.name]["runs_img_s"].append(case.images / max(t.seconds, 1e-9))
    for res in out.values():
        res["img_s"] = statistics.median(res["runs_img_s"])
    return out


# ---------------------------------------------------------------- the three measurements


def _on_device(model: nn.Module, run: RunConfig, device: torch.device) -> nn.Module:
    """A copy of ``model`` on ``device`` in the memory format and compile mode of ``run``."""
    m = copy.deepcopy(model).to(device)
    if channels_last(run, device):
        m = m.to(memory_format=torch.channels_last)
    return torch.compile(m) if run.compile else m


def _batch(run: RunConfig, device: torch.device, batch: int, classes: int):
    gen = torch.Generator().manual_seed(run.seed)
    x = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen).to(device)
    if channels_last(run, device):
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, classes, (batch,), generator=gen).to(device)


def model_limit_case(model: nn.Module, run: RunConfig, device: torch.device, steps: int,
                     name: str = "model_limit") -> Case:
    """Forward + backward + optimizer step on one device-resident batch, nothing else."""
    m = _on_device(model, run, device).train()
    optimizer = make_optimizer(m, run)
    x, y = _batch(run, device, run.batch_size, model.num_classes)

    def one_round(_round: int) -> None:
        for _ in range(steps):
            loss = F.cross_entropy(m(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return Case(name, one_round, steps * run.batch_size)


def loop_case(model: nn.Module, run: RunConfig, accelerator, data, kind: str,
              name: str | None = None) -> Case:
    """One epoch of ``run.limit_batches`` steps through the real fine-tune code path."""
    loader = training_loader(run, data, accelerator, kind)
    m = copy.deepcopy(model).to(accelerator.device)
    optimizer = make_optimizer(m, run)
    m, optimizer = prepare_model(m, run, accelerator, optimizer)

    def one_round(epoch: int) -> None:
        loader.set_epoch(epoch)
        train_one_epoch(m, loader, optimizer, accelerator=accelerator, run=run, epoch=epoch)

    return Case(name or f"loop_{kind}", one_round, loader.num_samples * accelerator.num_processes)


def inference_case(model: nn.Module, run: RunConfig, device: torch.device, steps: int,
                   name: str) -> Case:
    """Eval-mode forward passes under no_grad on one device-resident batch."""
    m = _on_device(model, run, device).eval()
    x, _ = _batch(run, device, run.batch_size, model.num_classes)

    @torch.no_grad()
    def one_round(_round: int) -> None:
        for _ in range(steps):
            m(x)

    return Case(name, one_round, steps * run.batch_size)


# ---------------------------------------------------------------- one bench run


@dataclass
class BenchOptions:
    """Everything ``bench`` takes (defaults = the CLI's)."""

    checkpoint: str | None = None
    ratio: float | None = None
    arch: str = DEFAULT_ARCH
    batch_size: int = 100
    steps: int = 10
    repeats: int = 5
    cpu: bool = False
    num_workers: int = 2
    loaders: tuple[str, ...] = LOADER_KINDS
    seed: int = 0
    compile: bool = False
    tf32: bool = True
    channels_last: bool = True
    inference: bool = True
    round_to: int = 1  # > 1: also time the model pruned at the same ratio with --round-to


def check_options(opts: BenchOptions) -> None:
    """ConfigError naming the option and a valid value for anything unusable."""
    for flag, value in (("--batch-size", opts.batch_size), ("--steps", opts.steps),
                        ("--repeats", opts.repeats), ("--round-to", opts.round_to)):
        if value < 1:
            raise ConfigError(f"{flag} {value}: must be 1 or more")
    if opts.num_workers < 0:
        raise ConfigError(f"--num-workers {opts.num_workers}: must be 0 or more")
    bad = [k for k in opts.loaders if k not in LOADER_KINDS]
    if bad or not opts.loaders:
        raise ConfigError(f"--loaders {','.join(opts.loaders)!r}: use a comma-separated "
                          f"subset of {','.join(LOADER_KINDS)}")


def run_config(opts: BenchOptions, **changes: Any) -> RunConfig:
    """The fine-tune RunConfig the loop runs with (Adam, lr 1e-3, FP32, synthetic data)."""
    images = opts.batch_size * opts.steps
    return RunConfig(command="finetune", dataset="synthetic", synthetic_train=images,
                     synthetic_test=opts.batch_size, batch_size=opts.batch_size,
                     num_workers=opts.num_workers, limit_batches=opts.steps, cpu=opts.cpu,
                     seed=opts.seed, compile=opts.compile, tf32=opts.tf32,
                     channels_last=opts.channels_last).replace(**changes)


def synthetic_data(run: RunConfig):
    return build_datasets("synthetic", "", image_size=IMAGE_SIZE, download=False,
                          synthetic_train=run.synthetic_train,
                          synthetic_test=run.synthetic_test, seed=run.seed)


def device_info(device: torch.device) -> dict[str, Any]:
    """The device in words, torch/CUDA versions, cores and threads."""
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__,
                            "cpu_model": cpu_model(), "cpu_cores": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(),
                            "python": platform.python_version()}
    if device.type == "cuda":
        info.update(device_name=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), gpus=torch.cuda.device_count(),
                    cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                    matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                    cudnn_benchmark=torch.backends.cudnn.benchmark)
    else:
        info["device_name"] = info["cpu_model"]
    return info


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_bench(opts: BenchOptions) -> dict[str, Any]:
    """Measure model limit, loop per loader and inference; return the result dict."""
    check_options(opts)
    load_before = os.getloadavg()
    pruned, unpruned, models = bench_models(opts.checkpoint, opts.ratio, opts.seed, opts.arch)
    run = run_config(opts)
    accelerator = make_accelerator(run)
    run = run.replace(num_processes=accelerator.num_processes)
    device = accelerator.device
    data = synthetic_data(run)
    cases = [model_limit_case(pruned, run, device, opts.steps)]
    cases += [loop_case(pruned, run, accelerator, data, kind) for kind in opts.loaders]
    if opts.inference:
        cases += [inference_case(m, run, device, opts.steps, f"inference_{name}")
                  for name, m in (("pruned", pruned), ("unpruned", unpruned))]
    if opts.round_to > 1:  # the same ratio, each pruned layer at a multiple of round_to
        rounded = rounded_model(unpruned, models, opts)
        models["rounded_params"] = sum(p.numel() for p in rounded.parameters())
        cases += [model_limit_case(rounded, run, device, opts.steps, "model_limit_rounded"),
                  inference_case(rounded, run, device, opts.steps, "inference_rounded")]
    res = measure(cases, opts.repeats, device)
    default = loader_kind(run.replace(loader="auto"), device)
    return summarize(res, opts, device, models, default,
                     {"load_avg_1min": [load_before[0], os.getloadavg()[0]]})


def summarize(res: dict[str, dict[str, Any]], opts: BenchOptions, device: torch.device,
              models: dict[str, Any], default: str, extra: dict[str, Any]) -> dict[str, Any]:
    """The JSON object: figures, ratios and everything needed to reproduce them."""
    limit = res["model_limit"]["img_s"]
    loops = {k: res[f"loop_{k}"]["img_s"] for k in opts.loaders}
    out: dict[str, Any] = {
        **device_info(device), "batch_size": opts.batch_size, "steps": opts.steps,
        "repeats": opts.repeats, "num_workers": opts.num_workers, "model": models,
        "settings": {"precision": "fp32", "tf32": opts.tf32, "compile": opts.compile,
                     "channels_last": opts.channels_last and device.type == "cuda",
                     "cudnn_benchmark": device.type == "cuda"},
        "model_limit_img_s": limit, "loop_img_s": loops,
        "loop_over_model_limit_per_loader": {k: v / limit for k, v in loops.items()},
        "loop_over_model_limit_paired": {k: paired_ratio(res[f"loop_{k}"], res["model_limit"])
                                         for k in loops},
        "default_loader": default,
        "loop_over_model_limit": loops[default] / limit if default in loops else None,
        "runs_img_s": {k: v["runs_img_s"] for k, v in res.items()},
        "warmup_s": {k: v["warmup_s"] for k, v in res.items()}, **extra}
    if opts.inference:
        inf = {k: res[f"inference_{k}"]["img_s"] for k in ("pruned", "unpruned")}
        out["inference_img_s"] = inf
        out["inference_speedup"] = inf["pruned"] / inf["unpruned"]
    if opts.round_to > 1:
        out["round_to"] = {"k": opts.round_to,
                           "model_limit_img_s": res["model_limit_rounded"]["img_s"],
                           "inference_img_s": res["inference_rounded"]["img_s"]}
    return out


def rounded_model(unpruned: nn.Module, models: dict[str, Any], opts: BenchOptions) -> nn.Module:
    """The unpruned model pruned at the same ratio with --round-to (a checkpoint: its ratio)."""
    ratio = models.get("ratio") or DEFAULT_RATIO
    return prune(unpruned, ratio, round_to=opts.round_to).model


def paired_ratio(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Median over rounds of a_r / b_r: round r of both ran back to back, under one load."""
    return statistics.median(x / y for x, y in zip(a["runs_img_s"], b["runs_img_s"]))

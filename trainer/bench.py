"""``bench``: how close the fine-tune loop runs to the speed of the model itself.

Measured in one run, on one device, with the same settings (FP32, TF32 / channels_last /
cudnn.benchmark / compile as configured):

* **model limit**: forward + backward + Adam step (the fine-tune recipe: lr 1e-3, no weight
  decay) on one batch already on the device; no data pipeline, no Accelerate, no checks;
* **loop**: the real fine-tune code path -- ``trainer.engine.train_one_epoch`` with a real
  Accelerator, ``prepare_model`` and ``make_train_loader`` -- over CIFAR-shaped synthetic
  images (``trainer.data.build_datasets("synthetic")``), once per loader kind;
* **inference**: eval-mode forward of the pruned and of the unpruned model.

Every figure is images/s: a warm-up round first (not timed; it holds cudnn autotuning and
torch.compile), then ``repeats`` timed rounds of ``steps`` batches, and the median. The
rounds of all measurements are interleaved (round 1 of each, then round 2 of each, ...), so
a change of machine load hits them alike and their ratios stay meaningful. On CUDA each
round is timed with CUDA events between two synchronisations.

Models: ``--checkpoint`` measures a real (pruned) checkpoint against a full-width ResNet-50
with the same number of classes. ``--ratio R`` (default 0.9) builds the pruned model
without any file: a randomly initialised ResNet-50 whose BatchNorm gammas are drawn from
U(0, 1) with ``--seed``, pruned by ``trainer.prune.prune`` at R. Random gammas prune every
layer to about the same fraction, whereas a trained network-slimming model keeps more of its
early, high-resolution layers, so a real checkpoint at the same ratio has more MACs and is
slower: quote ``--checkpoint`` figures when one exists.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import torch
import torch.nn.functional as F
import typer
from torch import nn

from trainer.config import RunConfig
from trainer.errors import ConfigError
from trainer.models import ResNet50, batchnorms
from trainer.profiling import Timer

LOADERS = ("torch", "gpu")
DEFAULT_RATIO = 0.9
IMAGE_SIZE = 32  # CIFAR


# ---------------------------------------------------------------- models


def random_gamma_resnet(num_classes: int = 10, seed: int = 0) -> ResNet50:
    """A randomly initialised ResNet-50 whose BatchNorm gammas are seeded U(0, 1) draws."""
    torch.manual_seed(seed)
    model = ResNet50(num_classes)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, bn in batchnorms(model):
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=gen))
    return model


def bench_models(checkpoint: str | None = None, ratio: float | None = None,
                 seed: int = 0) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """(pruned, unpruned, description) for ``--checkpoint`` or ``--ratio`` (see module doc)."""
    from trainer.profiling import profile_model

    if checkpoint is not None and ratio is not None:
        raise ConfigError("give --checkpoint or --ratio, not both")
    if checkpoint is not None:
        from trainer.checkpoint import build_model, load_checkpoint

        ckpt = load_checkpoint(checkpoint)
        pruned = build_model(ckpt)
        torch.manual_seed(seed)
        unpruned = ResNet50(ckpt["num_classes"])
        source = {"checkpoint": str(checkpoint), "ratio": ckpt.get("prune", {}).get("ratio")}
    else:
        from trainer.prune import prune

        ratio = DEFAULT_RATIO if ratio is None else ratio
        if not 0 < ratio < 1:
            raise ConfigError(f"--ratio {ratio} is outside (0, 1); e.g. --ratio 0.9")
        unpruned = random_gamma_resnet(10, seed)
        pruned = prune(unpruned, ratio).model
        source = {"checkpoint": None, "ratio": ratio, "gammas": f"U(0, 1), seed {seed}"}
    sizes = {name: profile_model(m, IMAGE_SIZE) for name, m in
             (("pruned", pruned), ("unpruned", unpruned))}
    info = {**source, "num_classes": pruned.num_classes,
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


def _channels_last(cfg: RunConfig, device: torch.device) -> bool:
    return cfg.channels_last and device.type == "cuda"  # the rule of runner.prepare_model


def _on_device(model: nn.Module, cfg: RunConfig, device: torch.device) -> nn.Module:
    """A copy of ``model`` on ``device`` in the memory format and compile mode of ``cfg``."""
    m = copy.deepcopy(model).to(device)
    if _channels_last(cfg, device):
        m = m.to(memory_format=torch.channels_last)
    return torch.compile(m) if cfg.compile else m


def _batch(cfg: RunConfig, device: torch.device, batch: int, classes: int):
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen).to(device)
    if _channels_last(cfg, device):
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, classes, (batch,), generator=gen).to(device)


def model_limit_case(model: nn.Module, cfg: RunConfig, device: torch.device, steps: int,
                     name: str = "model_limit") -> Case:
    """Forward + backward + optimizer step on one device-resident batch, nothing else."""
    from trainer.engine import make_optimizer

    m = _on_device(model, cfg, device).train()
    optimizer = make_optimizer(m, cfg)
    x, y = _batch(cfg, device, cfg.batch_size, model.num_classes)

    def run(_round: int) -> None:
        for _ in range(steps):
            loss = F.cross_entropy(m(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return Case(name, run, steps * cfg.batch_size)


def loop_case(model: nn.Module, cfg: RunConfig, accelerator, data, kind: str,
              name: str | None = None) -> Case:
    """One epoch of ``cfg.limit_batches`` steps through the real fine-tune code path."""
    from trainer.data import make_train_loader
    from trainer.engine import make_optimizer, train_one_epoch
    from trainer.runner import per_process_batch, prepare_model

    loader = make_train_loader(
        data, batch_size=per_process_batch(cfg), num_workers=cfg.num_workers,
        rank=accelerator.process_index, world_size=accelerator.num_processes, seed=cfg.seed,
        kind=kind, device=accelerator.device, limit_batches=cfg.limit_batches,
        channels_last=_channels_last(cfg, accelerator.device))
    m = copy.deepcopy(model).to(accelerator.device)
    optimizer = make_optimizer(m, cfg)
    m, optimizer = prepare_model(m, cfg, accelerator, optimizer)

    def run(epoch: int) -> None:
        loader.set_epoch(epoch)
        train_one_epoch(m, loader, optimizer, accelerator=accelerator, cfg=cfg, epoch=epoch)

    return Case(name or f"loop_{kind}", run, loader.num_samples * accelerator.num_processes)


def inference_case(model: nn.Module, cfg: RunConfig, device: torch.device, steps: int,
                   name: str) -> Case:
    """Eval-mode forward passes under no_grad on one device-resident batch."""
    m = _on_device(model, cfg, device).eval()
    x, _ = _batch(cfg, device, cfg.batch_size, model.num_classes)

    @torch.no_grad()
    def run(_round: int) -> None:
        for _ in range(steps):
            m(x)

    return Case(name, run, steps * cfg.batch_size)


# ---------------------------------------------------------------- one bench run


@dataclass
class BenchOptions:
    """Everything ``bench`` takes (defaults = the CLI's)."""

    checkpoint: str | None = None
    ratio: float | None = None
    batch_size: int = 100
    steps: int = 10
    repeats: int = 5
    cpu: bool = False
    num_workers: int = 2
    loaders: tuple[str, ...] = LOADERS
    seed: int = 0
    compile: bool = False
    tf32: bool = True
    channels_last: bool = True
    inference: bool = True


def check_options(opts: BenchOptions) -> None:
    """ConfigError naming the option and a valid value for anything unusable."""
    for flag, value in (("--batch-size", opts.batch_size), ("--steps", opts.steps),
                        ("--repeats", opts.repeats)):
        if value < 1:
            raise ConfigError(f"{flag} {value}: must be 1 or more")
    if opts.num_workers < 0:
        raise ConfigError(f"--num-workers {opts.num_workers}: must be 0 or more")
    bad = [k for k in opts.loaders if k not in LOADERS]
    if bad or not opts.loaders:
        raise ConfigError(f"--loaders {','.join(opts.loaders)!r}: use a comma-separated "
                          f"subset of {','.join(LOADERS)}")


def run_config(opts: BenchOptions, **changes: Any) -> RunConfig:
    """The fine-tune RunConfig the loop runs with (Adam, lr 1e-3, FP32, synthetic data)."""
    images = opts.batch_size * opts.steps
    return RunConfig(command="finetune", dataset="synthetic", synthetic_train=images,
                     synthetic_test=opts.batch_size, batch_size=opts.batch_size,
                     num_workers=opts.num_workers, limit_batches=opts.steps, cpu=opts.cpu,
                     seed=opts.seed, compile=opts.compile, tf32=opts.tf32,
                     channels_last=opts.channels_last).replace(**changes)


def synthetic_data(cfg: RunConfig):
    from trainer.data import build_datasets

    return build_datasets("synthetic", "", image_size=IMAGE_SIZE, download=False,
                          synthetic_train=cfg.synthetic_train,
                          synthetic_test=cfg.synthetic_test, seed=cfg.seed)


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
    from trainer.runner import loader_kind, make_accelerator

    check_options(opts)
    load_before = os.getloadavg()
    pruned, unpruned, models = bench_models(opts.checkpoint, opts.ratio, opts.seed)
    cfg = run_config(opts)
    accelerator = make_accelerator(cfg)
    cfg = cfg.replace(num_processes=accelerator.num_processes)
    device = accelerator.device
    data = synthetic_data(cfg)
    cases = [model_limit_case(pruned, cfg, device, opts.steps)]
    cases += [loop_case(pruned, cfg, accelerator, data, kind) for kind in opts.loaders]
    if opts.inference:
        cases += [inference_case(m, cfg, device, opts.steps, f"inference_{name}")
                  for name, m in (("pruned", pruned), ("unpruned", unpruned))]
    res = measure(cases, opts.repeats, device)
    default = loader_kind(cfg.replace(loader="auto"), device)
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
    return out


def paired_ratio(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Median over rounds of a_r / b_r: round r of both ran back to back, under one load."""
    return statistics.median(x / y for x, y in zip(a["runs_img_s"], b["runs_img_s"]))


# ---------------------------------------------------------------- CLI


def _rows(result: dict[str, Any]) -> list[tuple[str, float, list[float], float | None]]:
    limit = result["model_limit_img_s"]
    runs = result["runs_img_s"]
    rows = [("model limit (fwd+bwd+Adam, batch on device)", limit, runs["model_limit"], 1.0)]
    for kind, rate in result["loop_img_s"].items():
        workers = f", {result['num_workers']} workers" if kind == "torch" else ""
        rows.append((f"fine-tune loop, {kind} loader{workers}", rate, runs[f"loop_{kind}"],
                     rate / limit))
    for name, rate in result.get("inference_img_s", {}).items():
        rows.append((f"inference, {name} model", rate, runs[f"inference_{name}"], None))
    return rows


def print_result(result: dict[str, Any]) -> None:
    """A table of medians (and the spread of the runs) plus the headline ratios."""
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=120)  # logs: no wrapping at 80 columns
    m = result["model"]
    table = Table(title=f"bench on {result['device_name']} ({result['device']}), batch "
                        f"{result['batch_size']}, {result['steps']} steps x "
                        f"{result['repeats']} repeats, torch {result['torch']}")
    for col in ("measurement", "images/s (median)", "runs min-max", "/ model limit"):
        table.add_column(col, justify="left" if col == "measurement" else "right")
    for label, rate, runs, ratio in _rows(result):
        table.add_row(label, f"{rate:,.1f}", f"{min(runs):,.1f}-{max(runs):,.1f}",
                      "" if ratio is None else f"{ratio:.3f}")
    console.print(table)
    console.print(f"pruned model: {m['pruned_params']:,} params, {m['pruned_macs'] / 1e6:.1f}M "
                  f"MACs/image; unpruned {m['unpruned_params']:,} params, "
                  f"{m['unpruned_macs'] / 1e6:.1f}M MACs/image")
    if result["loop_over_model_limit"] is not None:
        kind = result["default_loader"]
        console.print(f"loop / model limit ({kind} loader, the default here): "
                      f"{result['loop_over_model_limit']:.3f} (ratio of medians); "
                      f"{result['loop_over_model_limit_paired'][kind]:.3f} (median of "
                      "per-round ratios)")
    if "inference_speedup" in result:
        console.print(f"inference: pruned / unpruned = {result['inference_speedup']:.2f}x")


def parse_loaders(text: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in text.split(",") if k.strip())


def bench_command(
    checkpoint: Annotated[str | None, typer.Option(
        "--checkpoint", help="Measure this (pruned) checkpoint.")] = None,
    ratio: Annotated[float | None, typer.Option(
        "--ratio", help="Without --checkpoint: prune a random-gamma ResNet-50 at this ratio "
                        "(default 0.9).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Batch size.")] = 100,
    steps: Annotated[int, typer.Option("--steps", help="Batches per timed round.")] = 10,
    repeats: Annotated[int, typer.Option(
        "--repeats", help="Timed rounds per measurement (the median is reported).")] = 5,
    cpu: Annotated[bool, typer.Option("--cpu", help="Run on CPU even if CUDA exists.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    num_workers: Annotated[int, typer.Option(
        "--num-workers", help="DataLoader workers of the torch loader.")] = 2,
    loaders: Annotated[str, typer.Option(
        "--loaders", help="Loader kinds to time, comma-separated: torch, gpu.")] = "torch,gpu",
    seed: Annotated[int, typer.Option("--seed", help="Seed of gammas, weights, data.")] = 0,
    compile_: Annotated[bool, typer.Option(
        "--compile/--no-compile", help="torch.compile (compile time is in warmup_s).")] = False,
    tf32: Annotated[bool, typer.Option(
        "--tf32/--no-tf32", help="TF32 convolutions on CUDA (PyTorch default).")] = True,
    channels_last: Annotated[bool, typer.Option(
        "--channels-last/--no-channels-last", help="channels_last on CUDA.")] = True,
    inference: Annotated[bool, typer.Option(
        "--inference/--no-inference", help="Also time pruned vs unpruned inference.")] = True,
) -> int:
    """Images/s of the model alone, of the real fine-tune loop per loader, and of inference.

    Model limit = forward+backward+Adam on a batch already on the device; loop = the real
    train_one_epoch with each loader on CIFAR-shaped synthetic data; the ratio loop / model
    limit says how much the data pipeline and the framework cost. Medians of --repeats
    interleaved rounds after a warm-up round.
    """
    opts = BenchOptions(checkpoint=checkpoint, ratio=ratio, batch_size=batch_size, steps=steps,
                        repeats=repeats, cpu=cpu, num_workers=num_workers,
                        loaders=parse_loaders(loaders), seed=seed, compile=compile_, tf32=tf32,
                        channels_last=channels_last, inference=inference)
    result = run_bench(opts)
    if json_out:
        print(json.dumps(result))
    else:
        print_result(result)
    return 0


def register(app: typer.Typer) -> None:
    """Add the ``bench`` command to ``app``."""
    app.command("bench")(bench_command)

"""``bench``'s command line: options and the table it prints (the measurements:
trainer.measure.bench)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from trainer.cli.archopt import names_user_model
from trainer.cli.common import ThreadsOption, use_threads
from trainer.config.settings import LOADER_KINDS


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
    if "round_to" in result:
        k = result["round_to"]["k"]
        rows.append((f"model limit, pruned --round-to {k}", result["round_to"][
            "model_limit_img_s"], runs["model_limit_rounded"], None))
        rows.append((f"inference, pruned --round-to {k}", result["round_to"][
            "inference_img_s"], runs["inference_rounded"], None))
    return rows


def print_result(result: dict[str, Any]) -> None:
    """A table of medians (and the spread of the runs) plus the headline ratios."""
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
    if "threads" in result:
        console.print(f"threads: {result['threads']}")
    console.print(f"pruned model: {m['pruned_params']:,} params, {m['pruned_macs'] / 1e6:.1f}M "
                  f"MACs/image; unpruned {m['unpruned_params']:,} params, "
                  f"{m['unpruned_macs'] / 1e6:.1f}M MACs/image")
    if "round_to" in result and "inference_img_s" in result:
        rounded = result["round_to"]
        speed = rounded["inference_img_s"] / result["inference_img_s"]["pruned"]
        console.print(f"pruned with --round-to {rounded['k']}: {m['rounded_params']:,} params; "
                      f"inference {speed:.2f}x the pruned model's")
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


@names_user_model
def bench_command(
    checkpoint: Annotated[str | None, typer.Option(
        "--checkpoint", help="Measure this (pruned) checkpoint.")] = None,
    arch: Annotated[str, typer.Option(
        "--arch", help="Without --checkpoint: the architecture to measure (your own model: "
                       "module.path:factory); with it, that of a file of your own "
                       "model.")] = "resnet50",
    ratio: Annotated[float | None, typer.Option(
        "--ratio", help="Without --checkpoint: prune a random-gamma --arch model at this ratio "
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
        "--loaders", help="Loader kinds to time, comma-separated.")] = ",".join(LOADER_KINDS),
    seed: Annotated[int, typer.Option("--seed", help="Seed of gammas, weights, data.")] = 0,
    compile_: Annotated[bool, typer.Option(
        "--compile/--no-compile", help="torch.compile (compile time is in warmup_s).")] = False,
    tf32: Annotated[bool, typer.Option(
        "--tf32/--no-tf32", help="TF32 convolutions on CUDA (PyTorch default).")] = True,
    channels_last: Annotated[bool, typer.Option(
        "--channels-last/--no-channels-last", help="channels_last on CUDA.")] = True,
    inference: Annotated[bool, typer.Option(
        "--inference/--no-inference", help="Also time pruned vs unpruned inference.")] = True,
    round_to: Annotated[int, typer.Option(
        "--round-to", help="Also time the model pruned at the same ratio with every pruned "
                           "layer at a multiple of this many channels (1 = off), e.g. 8.")] = 1,
    threads: ThreadsOption = None,
) -> int:
    """Images/s of the model alone, of the real fine-tune loop per loader, and of inference.

    Model limit = forward+backward+Adam on a batch already on the device; loop = the real
    train_one_epoch with each loader on CIFAR-shaped synthetic data; the ratio loop / model
    limit says how much the data pipeline and the framework cost. Medians of --repeats
    interleaved rounds after a warm-up round.
    """
    from trainer.measure.bench import BenchOptions, run_bench

    why = use_threads(threads)
    opts = BenchOptions(checkpoint=checkpoint, ratio=ratio, arch=arch, batch_size=batch_size,
                        steps=steps, repeats=repeats, cpu=cpu, num_workers=num_workers,
                        loaders=parse_loaders(loaders), seed=seed, compile=compile_, tf32=tf32,
                        channels_last=channels_last, inference=inference, round_to=round_to)
    result = run_bench(opts)
    result["threads"] = why
    if json_out:
        print(json.dumps(result))
    else:
        print_result(result)
    return 0


def register(app: typer.Typer) -> None:
    """Add the ``bench`` command to ``app``."""
    app.command("bench")(bench_command)

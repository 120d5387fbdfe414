"""One-shot GPU benchmark of slimtune: run it once on a GPU machine, keep the JSON it writes.

    python bench/gpu_bench.py [OUT.json]            # default bench/results_gpu.json
    python bench/gpu_bench.py OUT.json --cpu --quick   # tiny CPU smoke run (tests use it)

Needs no network and no files: the data is the built-in CIFAR-shaped synthetic set
(``trainer.data.datasets.build_datasets("synthetic")``), the models are the full-width ResNet-50 and
the same network pruned at 0.9 after its BatchNorm gammas were drawn from a seeded U(0, 1)
(see ``trainer.measure.bench``). It measures, all in FP32 with the default fast settings (TF32
convolutions, channels_last, cudnn.benchmark):

1. ``training``: for each batch size, model limit (fwd+bwd+Adam on a device-resident batch),
   the real fine-tune loop with the torch and the gpu loader, for the pruned and the
   unpruned model, and eval-mode inference of both -- interleaved rounds, medians;
2. ``strict_fp32`` (CUDA only): model limit and gpu-loader loop with TF32 off (``--no-tf32``);
3. ``epoch_50k``: wall time of one fine-tune epoch over 50,000 CIFAR-sized images (batch 100,
   the recipe's) with the gpu loader, then with the torch loader, then with ``--compile``
   (first epoch, which holds the compile, reported separately), plus the evaluation over
   10,000 test images;
4. ``multi_gpu`` (only with 2+ GPUs): the gpu-loader loop under DataParallel in this process
   and under DDP in a ``torchrun`` subprocess, same global batch.

The JSON is rewritten after every section, so a run cut short still leaves its figures.
Optional parts are skipped (and say so) when ``--budget-s`` would be exceeded.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402 -- after the sys.path line

from trainer.files.atomic import atomic_write_text  # noqa: E402
from trainer.measure import bench  # noqa: E402

EPOCH_IMAGES, TEST_IMAGES, RECIPE_BATCH = 50_000, 10_000, 100


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("output", nargs="?", default=str(ROOT / "bench" / "results_gpu.json"))
    p.add_argument("--cpu", action="store_true", help="run on CPU (smoke test)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, no compile, no multi-GPU")
    p.add_argument("--batch-sizes", default="100,512", help="training batch sizes")
    p.add_argument("--steps", type=int, default=20, help="batches per timed round")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    p.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--no-compile", action="store_true", help="skip the --compile epoch")
    p.add_argument("--budget-s", type=float, default=480.0, help="skip optional parts past this")
    p.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.steps, args.repeats, args.num_workers = "4", 1, 2, 0
        args.no_compile = True
    args.batches = [int(b) for b in args.batch_sizes.split(",")]
    return args


def write_json(path: str, data: dict[str, Any]) -> None:
    """Atomic: a reader never sees half a file."""
    atomic_write_text(path, json.dumps(data, indent=1))


def options(args: argparse.Namespace, batch: int, **changes: Any) -> bench.BenchOptions:
    base = bench.BenchOptions(batch_size=batch, steps=args.steps, repeats=args.repeats,
                              cpu=args.cpu, num_workers=args.num_workers)
    for key, value in changes.items():
        setattr(base, key, value)
    return base


def training_section(args, accelerator, models: dict) -> dict[str, Any]:
    """Model limit, loop per loader and inference for every batch size and both models."""
    out = {}
    device = accelerator.device
    for batch in args.batches:
        cfg = bench.run_config(options(args, batch), num_processes=accelerator.num_processes)
        data = bench.synthetic_data(cfg)
        cases = []
        for name, model in models.items():
            cases.append(bench.model_limit_case(model, cfg, device, args.steps,
                                                f"{name}/model_limit"))
            cases += [bench.loop_case(model, cfg, accelerator, data, kind, f"{name}/loop_{kind}")
                      for kind in bench.LOADER_KINDS]
            cases.append(bench.inference_case(model, cfg, device, args.steps,
                                              f"{name}/inference"))
        res = bench.measure(cases, args.repeats, device)
        out[f"batch_{batch}"] = {name: model_figures(res, name) for name in models}
        del cases
        empty_cache(device)
    return out


def model_figures(res: dict, name: str) -> dict[str, Any]:
    limit = res[f"{name}/model_limit"]["img_s"]
    loops = {k: res[f"{name}/loop_{k}"]["img_s"] for k in bench.LOADER_KINDS}
    mine = {k.split("/", 1)[1]: v for k, v in res.items() if k.startswith(name + "/")}
    return {"model_limit_img_s": limit, "loop_img_s": loops,
            "loop_over_model_limit": {k: v / limit for k, v in loops.items()},
            "inference_img_s": res[f"{name}/inference"]["img_s"],
            "runs_img_s": {k: v["runs_img_s"] for k, v in mine.items()},
            "warmup_s": {k: v["warmup_s"] for k, v in mine.items()}}


def epoch_figures(args, accelerator, model, kind: str, compile_: bool) -> dict[str, Any]:
    """One epoch over EPOCH_IMAGES (first epoch apart), then the test-set evaluation."""
    from trainer.commands.evaluate import evaluate_model

    images, test = (16, 16) if args.quick else (EPOCH_IMAGES, TEST_IMAGES)
    batch = 8 if args.quick else RECIPE_BATCH
    cfg = bench.run_config(options(args, batch, compile=compile_),
                           num_processes=accelerator.num_processes, synthetic_train=images,
                           synthetic_test=test, limit_batches=None, loader=kind)
    data = bench.synthetic_data(cfg)
    case = bench.loop_case(model, cfg, accelerator, data, kind, "epoch")
    timed = bench.measure([case], 1 if args.quick else 2, accelerator.device)["epoch"]
    with bench.Timer(accelerator.device) as t:  # the real evaluation path, test loader included
        evaluate_model(copy.deepcopy(model), cfg, accelerator, data)
    return {"loader": kind, "compile": compile_, "images": case.images, "batch_size": batch,
            "first_epoch_s": timed["warmup_s"], "epoch_s": case.images / timed["img_s"],
            "img_s": timed["img_s"], "eval_images": test, "eval_s": t.seconds,
            "num_workers": cfg.num_workers if kind == "torch" else None}


def epoch_section(args, accelerator, pruned, clock) -> dict[str, Any]:
    out = {"gpu_loader": epoch_figures(args, accelerator, pruned, "gpu", False),
           "torch_loader": epoch_figures(args, accelerator, pruned, "torch", False)}
    if args.no_compile:
        out["gpu_loader_compile"] = {"skipped": "--no-compile / --quick"}
    elif clock.left() < 150:  # a compile of fwd+bwd takes about a minute
        out["gpu_loader_compile"] = {"skipped": f"time budget ({clock.left():.0f} s left)"}
    else:
        out["gpu_loader_compile"] = epoch_figures(args, accelerator, pruned, "gpu", True)
    return out


def multi_gpu_section(args, accelerator, pruned, clock) -> dict[str, Any]:
    """DP in this process vs DDP via torchrun, gpu loader, same global batch."""
    n = torch.cuda.device_count() if accelerator.device.type == "cuda" else 0
    if args.quick or n < 2:
        return {"skipped": f"{n} GPU(s) visible" if not args.quick else "--quick"}
    batch = args.batches[-1] * n  # per-GPU batch = the largest single-GPU batch
    cfg = bench.run_config(options(args, batch), mode="dp", loader="gpu",
                           num_processes=accelerator.num_processes)
    data = bench.synthetic_data(cfg)
    case = bench.loop_case(pruned, cfg, accelerator, data, "gpu", "dp")
    dp = bench.measure([case], args.repeats, accelerator.device)["dp"]
    out = {"gpus": n, "global_batch": batch, "dp_img_s": dp["img_s"],
           "dp_runs_img_s": dp["runs_img_s"]}
    if clock.left() < 120:
        out["ddp"] = {"skipped": f"time budget ({clock.left():.0f} s left)"}
        return out
    out["ddp"] = run_ddp(args, n, batch, min(clock.left() - 30, 300))
    return out


def run_ddp(args, n: int, batch: int, timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp, "ddp.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={n}", str(Path(__file__).resolve()), str(result),
               "--ddp-worker", "--batch-sizes", str(batch), "--steps", str(args.steps),
               "--repeats", str(args.repeats), "--num-workers", str(args.num_workers),
               *(["--cpu"] if args.cpu else [])]  # --cpu: gloo ranks, for the CPU test
        env = dict(os.environ, OMP_NUM_THREADS="4")
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                                  check=False)
        except subprocess.TimeoutExpired:
            return {"skipped": f"torchrun did not finish in {timeout:.0f} s"}
        if proc.returncode or not result.exists():
            return {"failed": f"exit {proc.returncode}: {proc.stderr[-800:]}"}
        return json.loads(result.read_text())


def ddp_worker(args) -> None:
    """One torchrun rank: the gpu-loader loop of the pruned model under DDP."""
    from trainer.train import dist
    from trainer.train.runtime import end_run, make_accelerator

    batch = args.batches[0]
    cfg = bench.run_config(options(args, batch), mode="ddp", loader="gpu")
    accelerator = make_accelerator(cfg)
    cfg = cfg.replace(num_processes=accelerator.num_processes)
    pruned, _, _ = bench.bench_models(seed=0)
    data = bench.synthetic_data(cfg)
    case = bench.loop_case(pruned, cfg, accelerator, data, "gpu", "ddp")
    res = bench.measure([case], args.repeats, accelerator.device)["ddp"]
    if dist.is_main():
        write_json(args.output, {"processes": accelerator.num_processes, "global_batch": batch,
                                 "img_s": res["img_s"], "runs_img_s": res["runs_img_s"]})
    end_run(accelerator)


def strict_fp32_section(args, accelerator, pruned, clock) -> dict[str, Any]:
    """--no-tf32 (strict IEEE FP32 matmul and conv): model limit and gpu-loader loop."""
    if accelerator.device.type != "cuda":
        return {"skipped": "TF32 exists on CUDA only"}
    if clock.left() < 60:
        return {"skipped": f"time budget ({clock.left():.0f} s left)"}
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        batch = args.batches[-1]
        cfg = bench.run_config(options(args, batch, tf32=False),
                               num_processes=accelerator.num_processes)
        data = bench.synthetic_data(cfg)
        cases = [bench.model_limit_case(pruned, cfg, accelerator.device, args.steps),
                 bench.loop_case(pruned, cfg, accelerator, data, "gpu")]
        res = bench.measure(cases, args.repeats, accelerator.device)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    limit, loop = res["model_limit"]["img_s"], res["loop_gpu"]["img_s"]
    return {"batch_size": batch, "model": "pruned_0.9", "model_limit_img_s": limit,
            "loop_gpu_img_s": loop, "loop_over_model_limit": loop / limit,
            "runs_img_s": {k: v["runs_img_s"] for k, v in res.items()}}


def summary(out: dict[str, Any]) -> list[str]:
    """The headline figures, one line each (also printed at the end of the run)."""
    lines = []
    for key, figs in out.get("training", {}).items():
        for model, f in figs.items():
            lines.append(f"{model} {key}: model limit {f['model_limit_img_s']:,.0f} img/s, "
                         f"loop gpu {f['loop_img_s']['gpu']:,.0f} "
                         f"({f['loop_over_model_limit']['gpu']:.3f}), loop torch "
                         f"{f['loop_img_s']['torch']:,.0f} "
                         f"({f['loop_over_model_limit']['torch']:.3f}), inference "
                         f"{f['inference_img_s']:,.0f} img/s")
    for key, e in out.get("epoch_50k", {}).items():
        if "epoch_s" in e:
            lines.append(f"epoch of {e['images']:,} images, {key}: {e['epoch_s']:.2f} s "
                         f"({e['img_s']:,.0f} img/s), first epoch {e['first_epoch_s']:.1f} s, "
                         f"eval of {e['eval_images']:,} {e['eval_s']:.2f} s")
    return lines


class Clock:
    def __init__(self, budget: float) -> None:
        self.t0, self.budget = time.perf_counter(), budget

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.ddp_worker:
        ddp_worker(args)
        from trainer.__main__ import leave

        leave(0)  # as the real worker leaves (no gloo group destroy: it deadlocked on torch 2.4)
    from trainer.train.runtime import make_accelerator

    clock = Clock(args.budget_s)
    accelerator = make_accelerator(bench.run_config(options(args, args.batches[0])))
    pruned, unpruned, models = bench.bench_models(ratio=0.9, seed=0)
    out: dict[str, Any] = {
        "script": "bench/gpu_bench.py", "argv": sys.argv[1:], "quick": args.quick,
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        **bench.device_info(accelerator.device), "precision": "fp32",
        "settings": {"tf32": "PyTorch default (TF32 convolutions)",
                     "channels_last": accelerator.device.type == "cuda",
                     "cudnn_benchmark": accelerator.device.type == "cuda"},
        "steps": args.steps, "repeats": args.repeats, "num_workers": args.num_workers,
        "model": models}
    sections = (("training", lambda: training_section(
                    args, accelerator, {"pruned_0.9": pruned, "unpruned": unpruned})),
                ("strict_fp32", lambda: strict_fp32_section(args, accelerator, pruned, clock)),
                ("epoch_50k", lambda: epoch_section(args, accelerator, pruned, clock)),
                ("multi_gpu", lambda: multi_gpu_section(args, accelerator, pruned, clock)))
    for name, run in sections:
        out[name] = run()
        out["wall_s"] = clock.elapsed()
        write_json(args.output, out)
        print(f"{name} done at {clock.elapsed():.0f} s -> {args.output}", flush=True)
    out["summary"] = summary(out)
    write_json(args.output, out)
    print("\n".join(out["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

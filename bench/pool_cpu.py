"""Two fine-tunes side by side on the pool (launch.pool) against one after the other, in one run.

    python bench/pool_cpu.py OUT.json [--repeats 3] [--quick]   # CPU: 2 cores
    python bench/pool_cpu.py OUT.json --gpu                     # 2 GPUs: 2 jobs x 1 GPU

CPU: ``--jobs 2`` as the pool runs it (1 thread each, OMP_NUM_THREADS=1) against the same two
fine-tunes one after the other with 2 threads each. GPU: the two at once, each on a GPU of its
own (CUDA_VISIBLE_DEVICES), against each alone on one GPU; the target is that the pair takes
at most 1.15x one alone. Each round runs both ways (the order alternates); the figures are the
medians of the rounds' wall times. The fine-tuned model: a resnet18 (CPU) or the lab's
resnet50 (GPU) trained for one epoch on the synthetic set and pruned at 50%.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from launch.pool import Job, Pool  # noqa: E402


def sizes(args) -> dict[str, str]:
    if args.gpu:
        return {"arch": "resnet50", "image": "32", "train": "5000", "batch": "100",
                "epochs": "2"}
    if args.quick:
        return {"arch": "resnet18", "image": "16", "train": "128", "batch": "32", "epochs": "1"}
    return {"arch": "resnet18", "image": "16", "train": "768", "batch": "32", "epochs": "2"}


def data(s: dict[str, str]) -> list[str]:
    return ["--dataset", "synthetic", "--image-size", s["image"], "--synthetic-train",
            s["train"], "--synthetic-test", "100", "--num-workers", "0"]


def launch(*argv: str, cwd: Path, env: dict[str, str]) -> None:
    r = subprocess.run([sys.executable, "-m", "launch", *argv], cwd=cwd, env=env,
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"failed: {' '.join(argv)}\n{r.stdout[-2000:]}{r.stderr[-2000:]}")


def prepare(work: Path, s: dict[str, str], cpu: list[str], env: dict[str, str]) -> Path:
    """A pruned checkpoint to fine-tune."""
    launch("train", "--arch", s["arch"], *data(s), "--epochs", "1", "--batch-size", s["batch"],
           "--sparsity", "1e-4", "--output", "sparse.pth", *cpu, cwd=work, env=env)
    launch("prune", "--checkpoint", "sparse.pth", "--ratio", "0.5", "--output", "pruned.pth",
           *cpu, cwd=work, env=env)
    return work / "pruned.pth"


def finetune(work: Path, s: dict[str, str], cpu: list[str], n: int, tag: str) -> list[str]:
    return [sys.executable, "-m", "launch", "finetune", "--checkpoint", "pruned.pth", *data(s),
            "--epochs", s["epochs"], "--batch-size", s["batch"], "--seed", str(n),
            "--output", f"{tag}/ft{n}.pth", "--plot", f"{tag}/ft{n}.png", "--overwrite", *cpu]


def together(work: Path, s, cpu, gpus: list[str] | None, tag: str) -> float:
    """Wall seconds of the two fine-tunes at once on the pool."""
    jobs = [Job(f"ft{n}", finetune(work, s, cpu, n, tag), work / tag / f"ft{n}.log",
                epochs=int(s["epochs"]))
            for n in (1, 2)]
    old = os.getcwd()
    os.chdir(work)
    try:
        start = time.perf_counter()
        code = Pool(jobs, gpus=gpus, slots=2, threads=1 if gpus is None else None,
                    logs=work / tag, console=None).run()
        took = time.perf_counter() - start
    finally:
        os.chdir(old)
    if code:
        sys.exit(f"the pool failed (exit code {code}); logs in {work / tag}")
    return took


def alone(work: Path, s, cpu, gpu: bool, tag: str) -> list[float]:
    """Wall seconds of each fine-tune run by itself (CPU: 2 threads; GPU: on GPU 0)."""
    env = os.environ | ({"CUDA_VISIBLE_DEVICES": "0"} if gpu else {"OMP_NUM_THREADS": "2"})
    out = []
    for n in (1, 2):
        start = time.perf_counter()
        subprocess.run(finetune(work, s, cpu, n, tag), cwd=work, env=env, check=True,
                       capture_output=True)
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 1 round (a rehearsal)")
    ap.add_argument("--gpu", action="store_true")
    args = ap.parse_args()
    if args.gpu:
        import torch

        if torch.cuda.device_count() < 2:
            print("pool GPU case skipped: it needs 2 GPUs (2 jobs x 1 GPU)")
            Path(args.out).write_text(json.dumps({"skipped": "fewer than 2 GPUs"}) + "\n")
            return
    repeats = 1 if args.quick else args.repeats
    s, cpu = sizes(args), ([] if args.gpu else ["--cpu"])
    work = Path(tempfile.mkdtemp(prefix="pool_bench_"))
    env = os.environ | {"PYTHONPATH": str(REPO)}
    os.environ["PYTHONPATH"] = str(REPO)
    prepare(work, s, cpu, env)
    pair, solo = [], []
    for r in range(repeats):
        for way in ((0, 1) if r % 2 == 0 else (1, 0)):
            if way == 0:
                pair.append(together(work, s, cpu, ["0", "1"] if args.gpu else None, f"p{r}"))
            else:
                solo.append(alone(work, s, cpu, args.gpu, f"s{r}"))
    one = statistics.median(max(t) if args.gpu else sum(t) for t in solo)
    both = statistics.median(pair)
    what = ("2 jobs x 1 GPU at once vs the slower one alone on 1 GPU" if args.gpu else
            "--jobs 2 (1 thread each) vs one after the other (2 threads each)")
    result = {"case": what, "sizes": s, "repeats": repeats, "together_s": pair,
              "alone_s": solo, "median_together_s": both, "median_alone_s": one,
              "ratio": both / one, "command": " ".join(finetune(work, s, cpu, 1, "x")[1:])}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{what}: {both:.1f} s vs {one:.1f} s (median of {repeats}), ratio {both / one:.2f}"
          + (" (target <= 1.15)" if args.gpu else ""))


if __name__ == "__main__":
    main()

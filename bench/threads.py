"""Threads on a shared CPU: 20 training steps of the demo's model, idle and beside a busy
neighbour, with torch's default thread count against slimtune's choice (trainer.config.threads)
and against one thread.

    python bench/threads.py [--steps 20] [--repeats 3] [--arch resnet50] [--image-size 16]

Each measurement is a fresh interpreter (threads are fixed at start), timed after 2 warm-up
steps; the two settings alternate, ``--repeats`` times, first on the machine as it is (it
should be idle: the script says how busy it found it), then with ``python -c "while 1: pass"``
running beside them. Prints a table of medians and the busy/idle ratio of each setting, and one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ("torch default", "slimtune", "1 thread")  # the last: the floor beside a neighbour


def child(setting: str, arch: str, size: int, steps: int, batch: int) -> None:
    """One measurement, in this fresh process: print {seconds, threads, why}."""
    import torch
    import torch.nn.functional as F

    from trainer.models.build import new_model

    why = "torch's default: one per core"
    if setting == "slimtune":
        from trainer.train.runtime import threads_for

        why = str(threads_for(None))
    elif setting == "1 thread":
        torch.set_num_threads(1)
        why = "one thread: all a run can have beside a neighbour that holds the other core"
    torch.manual_seed(0)
    model = new_model(arch, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    print(json.dumps({"seconds": time.perf_counter() - start,
                      "threads": torch.get_num_threads(), "why": why}))


def measure(setting: str, args: argparse.Namespace) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, __file__, "--child", setting, "--arch", args.arch,
                          "--image-size", str(args.image_size), "--steps", str(args.steps),
                          "--batch-size", str(args.batch_size)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def rounds(args: argparse.Namespace) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {s: [] for s in SETTINGS}
    for _ in range(args.repeats):
        for setting in SETTINGS:
            found[setting].append(measure(setting, args))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=SETTINGS)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.arch, args.image_size, args.steps, args.batch_size)
    from trainer.config.threads import busy_cores, cores

    before = busy_cores(1.0)
    print(f"{args.steps} steps of {args.arch} at {args.image_size} px, batch "
          f"{args.batch_size}, {cores()} cores; busy before the idle rounds: {before:.2f} cores")
    results = {"idle": rounds(args)}
    neighbour = subprocess.Popen([sys.executable, "-c", "while 1: pass"])
    try:
        time.sleep(2.0)
        results["one busy neighbour"] = rounds(args)
    finally:
        neighbour.kill()
    medians = {state: {s: statistics.median(r["seconds"] for r in runs)
                       for s, runs in found.items()} for state, found in results.items()}
    print(f"{'machine':<20}" + "".join(f"{s:>24}" for s in SETTINGS))
    for state, found in results.items():
        cells = [f"{medians[state][s]:6.1f} s ({found[s][0]['threads']} thr)" for s in SETTINGS]
        print(f"{state:<20}" + "".join(f"{c:>24}" for c in cells))
    ratios = {s: medians["one busy neighbour"][s] / medians["idle"][s] for s in SETTINGS}
    print("busy / idle: " + ", ".join(f"{s} {r:.2f}x" for s, r in ratios.items()))
    print(json.dumps({"medians_s": medians, "busy_over_idle": ratios,
                      "busy_before": before, "runs": results}))


if __name__ == "__main__":
    main()

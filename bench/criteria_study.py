"""Does slimming beat the baselines? The criteria study on the built-in synthetic set.

    python bench/criteria_study.py [--workdir DIR] [--seeds 0,1] [--jobs 2] ...

For every seed (the synthetic images, the initial weights and the random criterion all follow
it): one sparse training (network slimming), then for every criterion x allocation x ratio a
prune (accuracy right after it with the unpruned network's BatchNorm statistics and after
adaptive BN), a fine-tune, and the pruned architecture trained from scratch (Scratch-B: the
sparse run's recipe without sparsity, its epochs times the MACs saved). Every step is the real
command line (``train``, ``prune``, ``finetune``, ``train --scratch-from``), run in this
process. A scratch run depends only on the architecture and the seed, so architectures met
twice in a seed (uniform allocation gives every criterion the same widths) are trained once.

Writes <workdir>/seed<N>/ (checkpoints, figures, rows.json), and <workdir>/study.md (the table,
mean ± std over the seeds, and per seed), <workdir>/study.json, <workdir>/acc_vs_macs.png.
Seeds run in parallel with --jobs (one process, one thread each).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ACCS = ("acc_after_stale", "acc_after", "best_acc", "scratch_acc")


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="criteria_study")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--jobs", type=int, default=1, help="seeds run side by side")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--train-images", type=int, default=800)
    p.add_argument("--test-images", type=int, default=400)
    p.add_argument("--epochs", type=int, default=4, help="sparse training (Scratch-B's base)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--sparsity", type=float, default=2e-3)
    p.add_argument("--gamma-init", type=float, default=0.2)
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--ratios", default="0.5,0.8")
    p.add_argument("--criteria", default="bn,l1,random,taylor")
    p.add_argument("--allocations", default="global,uniform")
    p.add_argument("--scratch", default="B", choices=("E", "B", "none"))
    p.add_argument("--bn-recalibrate", type=int, default=20)
    p.add_argument("--prune-batch-size", type=int, default=40,
                   help="batches of adaptive BN and taylor (800 / 40: 20 batches)")
    return p.parse_args(argv)


def cli(*argv: Any) -> None:
    """One slimtune command, in this process; a failure stops the study."""
    from trainer.cli.app import build_app, run_app

    argv = [str(a) for a in argv]
    if run_app(build_app(), argv) != 0:
        raise SystemExit(f"failed: slimtune {' '.join(argv)}")


def run_seed(a: argparse.Namespace, seed: int) -> list[dict[str, Any]]:
    """The whole study for one seed; its rows (one per criterion, allocation, ratio)."""
    import torch

    from trainer.files.checkpoint import load_checkpoint, summarize_history
    from trainer.measure.profiling import profile_checkpoint

    torch.set_num_threads(1)
    work = Path(a.workdir) / f"seed{seed}"
    (work / "plots").mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # prune's histograms go to ./plots
    common = ["--seed", seed, "--cpu", "--num-workers", 0]
    data = ["--dataset", "synthetic", "--image-size", a.image_size, "--synthetic-train",
            a.train_images, "--synthetic-test", a.test_images]
    recipe = ["--arch", a.arch, "--epochs", a.epochs, "--batch-size", a.batch_size,
              "--gamma-init", a.gamma_init, *data, *common]
    sparse = Path("sparse.pth")
    if not sparse.exists():
        cli("train", *recipe, "--sparsity", a.sparsity, "--output", sparse)
    base = profile_checkpoint(sparse)
    rows, scratch_by_arch = [], {}
    for ratio in [float(r) for r in a.ratios.split(",")]:
        for criterion in a.criteria.split(","):
            for allocation in a.allocations.split(","):
                tag = f"{criterion}_{allocation}_{ratio:g}"
                pruned, tuned = Path(f"p_{tag}.pth"), Path(f"p_{tag}_finetune.pth")
                if not pruned.exists():
                    cli("prune", "--checkpoint", sparse, "--output", pruned, "--ratio", ratio,
                        "--criterion", criterion, "--allocation", allocation, "--scope",
                        "prunable", "--bn-recalibrate", a.bn_recalibrate, "--batch-size",
                        a.prune_batch_size, *common)
                if not tuned.exists():
                    cli("finetune", "--checkpoint", pruned, "--output", tuned, "--epochs",
                        a.finetune_epochs, "--batch-size", 32, *common)
                record = load_checkpoint(pruned)["prune"]
                profile = profile_checkpoint(pruned)
                row = {"seed": seed, "criterion": criterion, "allocation": allocation,
                       "ratio": ratio, "target": f"ratio {ratio:g}", "params": profile["params"],
                       "macs": profile["macs"], "acc_after_stale": record["acc_after_stale"],
                       "acc_after": record["acc_after"],
                       "bn_recalibrate": record["bn_recalibrate"],
                       "best_acc": summarize_history(load_checkpoint(tuned))["best_acc"],
                       "cfg": json.dumps(load_checkpoint(pruned)["cfg"])}
                if a.scratch != "none":
                    row["scratch"] = a.scratch
                    row["scratch_acc"] = scratch_by_arch.get(row["cfg"])
                    if row["scratch_acc"] is None:
                        out = Path(f"p_{tag}_scratch{a.scratch}.pth")
                        if not out.exists():
                            cli("train", "--scratch-from", pruned, "--scratch", a.scratch,
                                "--output", out, *recipe)
                        row["scratch_acc"] = summarize_history(load_checkpoint(out))["best_acc"]
                        scratch_by_arch[row["cfg"]] = row["scratch_acc"]
                rows.append(row)
                Path("rows.json").write_text(json.dumps(rows, indent=1))
    for row in rows:
        row["baseline_acc"], row["baseline_macs"] = base.get("best_acc"), base["macs"]
    Path("rows.json").write_text(json.dumps(rows, indent=1))
    return rows


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and (with several seeds) std of each accuracy per (criterion, allocation, ratio)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["ratio"], row["criterion"], row["allocation"]), []).append(row)
    out = []
    for group in groups.values():
        mean = dict(group[0])
        for key in (*ACCS, "params", "macs"):
            values = [r[key] for r in group if r.get(key) is not None]
            if not values:
                continue
            mean[key] = statistics.fmean(values)
            if key in ACCS and len(values) > 1:
                mean[f"{key}_std"] = statistics.stdev(values)
        mean["seeds"] = len(group)
        out.append(mean)
    return out


def write_outputs(a: argparse.Namespace, rows: list[dict[str, Any]]) -> str:
    from trainer.measure.plots import plot_accuracy_vs_macs
    from trainer.measure.report import StudyRow, comparison_markdown

    keys = {f.name for f in dataclasses.fields(StudyRow)}
    mean = aggregate(rows)
    base_acc = statistics.fmean({r["seed"]: r["baseline_acc"] for r in rows}.values())
    seeds = sorted({r["seed"] for r in rows})
    text = [f"{a.arch} at {a.image_size} px on the synthetic set ({a.train_images} train / "
            f"{a.test_images} test images), seeds {', '.join(map(str, seeds))}: sparse "
            f"training {a.epochs} epochs (batch {a.batch_size}, λ {a.sparsity:g}, γ from "
            f"{a.gamma_init:g}), prune --scope prunable --bn-recalibrate {a.bn_recalibrate}, "
            f"fine-tune {a.finetune_epochs} epochs, Scratch-{a.scratch}. Unpruned sparse model: "
            f"{base_acc:.2f}% (mean), {rows[0]['baseline_macs'] / 1e6:.2f}M MACs.", "",
            "Mean ± std over the seeds:", ""]
    text += comparison_markdown(mean)
    for seed in seeds:
        text += ["", f"Seed {seed}:", ""]
        text += comparison_markdown([r for r in rows if r["seed"] == seed])
    text += ["", "Best fine-tuned criterion per (allocation, target), and its margin over the "
             "next (mean over seeds):", ""]
    text += _winners(mean)
    workdir = Path(a.workdir)
    (workdir / "study.md").write_text("\n".join(text) + "\n")
    (workdir / "study.json").write_text(json.dumps({"args": vars(a), "rows": rows,
                                                    "mean": mean}, indent=1))
    plot_accuracy_vs_macs([{k: v for k, v in r.items() if k in keys or k.endswith("_std")}
                           for r in mean], workdir / "acc_vs_macs.png",
                          title=f"{a.arch}, synthetic {a.image_size} px: mean of "
                                f"{len(seeds)} seeds",
                          baseline={"macs": rows[0]["baseline_macs"], "best_acc": base_acc})
    return "\n".join(text)


def _winners(mean: list[dict[str, Any]]) -> list[str]:
    lines = []
    for key in sorted({(r["allocation"], r["ratio"]) for r in mean}):
        group = sorted((r for r in mean if (r["allocation"], r["ratio"]) == key),
                       key=lambda r: -r["best_acc"])
        if len(group) > 1:
            first, second = group[0], group[1]
            lines.append(f"- {key[0]}, ratio {key[1]:g}: {first['criterion']} "
                         f"{first['best_acc']:.2f}% vs {second['criterion']} "
                         f"{second['best_acc']:.2f}% (+{first['best_acc'] - second['best_acc']:.2f}"
                         " points)")
    return lines


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    a.workdir = str(Path(a.workdir).resolve())
    seeds = [int(s) for s in a.seeds.split(",")]
    start = time.time()
    if len(seeds) == 1 or a.jobs <= 1:
        rows = [r for s in seeds for r in run_seed(a, s)]
    else:  # one process per seed, one thread each
        env = dict(os.environ, OMP_NUM_THREADS="1")
        procs = [subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--seeds", str(s),
                                   "--workdir", a.workdir, "--jobs", "1"], env=env)
                 for s in seeds]
        if any(p.wait() for p in procs):
            return 1
        rows = [r for s in seeds
                for r in json.loads((Path(a.workdir) / f"seed{s}" / "rows.json").read_text())]
    print(write_outputs(a, rows))
    print(f"\n{time.time() - start:.0f} s; wrote {a.workdir}/study.md and acc_vs_macs.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How many batches should adaptive BN (prune --bn-recalibrate N) use? Measured on the models of
bench/criteria_study.py.

    python bench/bn_recalibrate.py --study criteria_study [--batches 0,1,2,5,10,20]

For every seed of the study, its sparse model is pruned again by each criterion and allocation
of the study (the same settings, so the same channels), and the pruned model's test accuracy is
measured after re-estimating its BatchNorm statistics on N training batches (N = 0: the unpruned
network's statistics, as before adaptive BN). Each N gets the mean accuracy over the candidates
and, per seed, Spearman's rank correlation between that accuracy and the candidates' fine-tuned
accuracy (EagleEye's question: does the accuracy right after pruning rank candidates as
fine-tuning does?). Prints a markdown table; one thread.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", default="criteria_study", help="bench/criteria_study.py's workdir")
    p.add_argument("--batches", default="0,1,2,5,10,20")
    a = p.parse_args(argv)
    import torch
    from scipy.stats import spearmanr

    from trainer.data.datasets import build_datasets
    from trainer.data.loaders import make_test_loader, make_train_loader
    from trainer.files.checkpoint import build_model, load_checkpoint
    from trainer.prune.engine import prune
    from trainer.train.loop import recalibrate_bn

    torch.set_num_threads(1)
    study = json.loads((Path(a.study) / "study.json").read_text())
    args, rows = study["args"], study["rows"]
    counts = [int(n) for n in a.batches.split(",")]
    acc: dict[int, dict[int, list[float]]] = {n: {} for n in counts}  # N -> seed -> per row
    tuned: dict[int, list[float]] = {}
    for seed in sorted({r["seed"] for r in rows}):
        ds = build_datasets("synthetic", "unused", image_size=args["image_size"],
                            synthetic_train=args["train_images"],
                            synthetic_test=args["test_images"], seed=seed)
        test = make_test_loader(ds, batch_size=100, num_workers=0)
        sparse = build_model(load_checkpoint(Path(args["workdir"]) / f"seed{seed}" /
                                             "sparse.pth"))

        def train(loader_seed: int):
            loader = make_train_loader(ds, batch_size=args["prune_batch_size"], num_workers=0,
                                       seed=loader_seed)
            loader.set_epoch(0)
            return loader

        for row in (r for r in rows if r["seed"] == seed):
            result = prune(sparse, row["ratio"], scope="prunable", criterion=row["criterion"],
                           allocation=row["allocation"], seed=seed,
                           batches=list(itertools.islice(train(seed), 10)))
            tuned.setdefault(seed, []).append(row["best_acc"])
            for n in counts:
                model = copy.deepcopy(result.model)
                recalibrate_bn(model, train(seed), n)
                acc[n].setdefault(seed, []).append(_accuracy(model, test))
    print("| N batches | mean acc right after pruning (%) | Spearman ρ with fine-tuned, "
          "per seed |")
    print("|---:|---:|---|")
    for n in counts:
        every = [v for per in acc[n].values() for v in per]
        rhos = [spearmanr(acc[n][s], tuned[s]).statistic for s in sorted(tuned)]
        print(f"| {n} | {statistics.fmean(every):.2f} (min {min(every):.2f}, max "
              f"{max(every):.2f}) | {', '.join(f'{r:+.2f}' for r in rhos)} |")
    return 0


def _accuracy(model, loader) -> float:
    import torch

    model.eval()
    hits = total = 0
    with torch.no_grad():
        for x, y in loader:
            hits += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return 100.0 * hits / total


if __name__ == "__main__":
    sys.exit(main())

"""Figures: training curves, BatchNorm-gamma histogram, pruned-vs-baseline comparison.

Every figure is titled, has labelled axes with units, is drawn off-screen (Agg) and is
written atomically (temp file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on training machines; must precede the pyplot import

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from trainer.files.atomic import atomic_path

DPI = 150
TRAIN_COLOR, TEST_COLOR = "#1f77b4", "#d62728"
BASE_COLOR, OTHER_COLORS = "#7f7f7f", ("#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")
# More LR changes than this means a smooth schedule (cosine, warm-up): one line per
# change would hide the curves, so the LR is drawn as its own curve instead.
MAX_LR_LINES = 6


def _save(fig: plt.Figure, path: str | os.PathLike) -> Path:
    """Tight-layout ``fig``, write it atomically as PNG to ``path``, close it."""
    try:
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    return Path(path)


def _series(history: Mapping[str, Any], key: str, n: int) -> list[float] | None:
    values = history.get(key)
    if values is None or len(values) != n:
        return None
    return [math.nan if v is None else float(v) for v in values]


def _lr_label(old: float, new: float) -> str:
    if new > 0 and old > 0 and abs(old / new - round(old / new)) < 1e-6 and round(old / new) > 1:
        return f"lr ÷{round(old / new)} → {new:.3g}"
    return f"lr → {new:.3g}"


def _mark_lr(axes: Sequence[plt.Axes], epochs: list[float], lrs: list[float] | None) -> None:
    """Dashed vertical line (labelled on the first panel) at each epoch where the LR changes."""
    if not lrs:
        return
    changes = [i for i in range(1, len(lrs)) if not math.isclose(lrs[i], lrs[i - 1], rel_tol=1e-9)]
    if not changes:
        return
    if len(changes) > MAX_LR_LINES:
        twin = axes[1].twinx()
        twin.plot(epochs, lrs, color="0.5", ls=":", lw=1.2, label="learning rate")
        twin.set_ylabel("learning rate", color="0.4")
        twin.set_yscale("log" if min(lrs) > 0 else "linear")
        twin.tick_params(axis="y", colors="0.4")
        return
    # tick labels on a top axis: inside the panel they would collide with the curves
    xs = [(epochs[i - 1] + epochs[i]) / 2 for i in changes]  # the change happens between epochs
    span = (epochs[-1] - epochs[0]) or 1.0
    # labels closer than ~1/6 of the panel would overlap side by side: stand them upright
    crowded = any(b - a < span / 6 for a, b in itertools.pairwise(xs))
    for ax in axes:
        for x in xs:
            ax.axvline(x, color="0.45", ls="--", lw=1)
        top = ax.secondary_xaxis("top")
        top.set_xticks(xs, [_lr_label(lrs[i - 1], lrs[i]) for i in changes], fontsize=8,
                       color="0.3", rotation=90 if crowded else 0)
        top.tick_params(length=0)


def plot_curves(history: Mapping[str, Any], path: str | os.PathLike, *, title: str,
                best_epoch: int | None = None) -> Path:
    """Accuracy and loss per epoch (train and test), LR changes and the best epoch marked.

    ``history`` holds equal-length lists ``epoch``, ``lr``, ``train_loss``, ``train_acc``,
    ``test_loss``, ``test_acc`` (accuracies in %); missing series are skipped.
    """
    n = len(history.get("epoch") or history.get("test_acc") or [])
    if n == 0:
        raise ValueError("history has no epochs to plot")
    epochs = _series(history, "epoch", n) or [float(i) for i in range(1, n + 1)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    marker = "o" if n <= 30 else None  # dots keep a 1-epoch run visible
    panels = ((axes[0], "acc", "accuracy (%)"), (axes[1], "loss", "loss (cross-entropy)"))
    for ax, kind, unit in panels:
        for split, color in (("train", TRAIN_COLOR), ("test", TEST_COLOR)):
            ys = _series(history, f"{split}_{kind}", n)
            if ys is not None:
                ax.plot(epochs, ys, color=color, marker=marker, ms=3.5, lw=1.6, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(unit)
        ax.set_title("accuracy" if kind == "acc" else "loss")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if n == 1:  # matplotlib would otherwise spread a single epoch over 0.95..1.05
            ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
    _mark_lr(axes, epochs, _series(history, "lr", n))
    _mark_best(axes[0], epochs, _series(history, "test_acc", n), best_epoch)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=9)
    fig.suptitle(title, fontsize=13)
    return _save(fig, path)


def _mark_best(ax: plt.Axes, epochs: list[float], test_acc: list[float] | None,
               best_epoch: int | None) -> None:
    """Star on the best test accuracy with 'best 91.2% @ epoch 14'."""
    if not test_acc or all(math.isnan(a) for a in test_acc):
        return
    if best_epoch is not None and best_epoch in epochs:
        i = epochs.index(best_epoch)
    else:
        i = int(np.nanargmax(test_acc))
    x, y = epochs[i], test_acc[i]
    # the text goes in the legend (placed where it hides least), the star on the point
    ax.plot([x], [y], ls="none", marker="*", ms=15, color="gold", mec="black", zorder=5,
            label=f"best {y:.1f}% @ epoch {x:g}")


def plot_gamma_hist(gammas: Any, path: str | os.PathLike, *, threshold: float | None,
                    title: str, log_count: bool = True, label: str | None = None,
                    xlabel: str | None = None) -> Path:
    """Histogram of |γ| over all BatchNorm channels (or another criterion's channel scores,
    named by ``xlabel``), with the pruning threshold marked (None: no line).

    ``gammas`` is a 1-D array or tensor; ``label`` names the threshold line (default
    "threshold <value>"). The count axis is logarithmic unless ``log_count`` is False.
    """
    values = np.abs(np.asarray(_to_numpy(gammas), dtype=np.float64).ravel())
    if values.size == 0:
        raise ValueError("no BatchNorm gammas to plot")
    fig, ax = plt.subplots(figsize=(8, 4.6))
    # Bins span the data (and the threshold), not [0, max]: after a short sparse run every γ
    # still sits near its initial 1.0, and a [0, 1] axis would draw one bar.
    marks = [values.min(), values.max()] + ([threshold] if threshold is not None else [])
    lo, hi = float(min(marks)), float(max(marks))
    pad = 0.02 * (hi - lo) or 0.01 * max(hi, 1e-3)
    counts, _, _ = ax.hist(values, bins=np.linspace(max(lo - pad, 0.0), hi + pad, 81),
                           color="#1f77b4", edgecolor="white", linewidth=0.3,
                           label=f"{values.size:,} channels")
    # headroom above the tallest bar keeps the legend off the bars
    if log_count:
        ax.set_yscale("log")
        ax.set_ylim(0.7, float(counts.max()) * 12)  # a bin of one channel stays visible
    else:
        ax.set_ylim(0, float(counts.max()) * 1.35)
    if threshold is not None:
        below = int((values <= threshold).sum())
        text = label or f"threshold {threshold:.4g}"
        ax.axvline(threshold, color="#d62728", ls="--", lw=1.8,
                   label=f"{text}\n{below:,} of {values.size:,} channels ≤ threshold "
                         f"({100 * below / values.size:.1f}%)")
    ax.set_xlabel(xlabel or "|γ| (BatchNorm scale)")
    ax.set_ylabel("channels (count, log scale)" if log_count else "channels (count)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=9)
    return _save(fig, path)


def _to_numpy(values: Any) -> Any:
    if hasattr(values, "detach"):  # torch tensor, possibly on GPU
        return values.detach().float().cpu().numpy()
    return values


def _pct_change(value: float, base: float) -> str:
    return f"{100 * (value - base) / base:+.1f}%" if base else ""


def plot_comparison(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, *,
                    title: str = "Pruned models vs baseline") -> Path:
    """Bars of best test accuracy (%), params (M) and MACs (M), one bar per row.

    Each row has ``label``, ``best_acc`` (or None), ``params``, ``macs``; the row with
    ``baseline=True`` (else the first) is the baseline every bar is compared against. When
    the rows carry measured latency (``report.add_latency``), a fourth panel sets each
    model's measured speed-up over the baseline beside its MAC reduction.
    """
    if not rows:
        raise ValueError("no rows to compare")
    base_i = next((i for i, r in enumerate(rows) if r.get("baseline")), 0)
    base = rows[base_i]
    labels = [str(r["label"]) for r in rows]
    colors = [BASE_COLOR if i == base_i else OTHER_COLORS[i % len(OTHER_COLORS)]
              for i in range(len(rows))]
    speed = all(r.get("latency") and r.get("mac_speedup") for r in rows)
    width = min(20.0, max(12.0, 2.7 * len(rows)))  # inches; ~0.9 in per bar per panel
    fig, axes = plt.subplots(1, 4 if speed else 3,
                             figsize=(width * 4 / 3 if speed else width, 5.0))
    if speed:
        _speedup_panel(axes[3], [r for i, r in enumerate(rows) if i != base_i] or [base])
    _acc_panel(axes[0], rows, base, labels, colors)
    for ax, key, name in ((axes[1], "params", "parameters"), (axes[2], "macs", "MACs")):
        values = [float(r[key]) / 1e6 for r in rows]
        texts = [f"{v:.2f}M" + ("\nbaseline" if r is base else
                                f"\n{_pct_change(float(r[key]), float(base[key]))}")
                 for v, r in zip(values, rows)]
        _bars(ax, labels, values, texts, colors)
        ax.set_ylabel(f"{name} (millions)")
        ax.set_title(f"{name} (M)" if key == "params" else "MACs (M), multiply-accumulates")
    fig.suptitle(title, fontsize=13)
    return _save(fig, path)


def _speedup_panel(ax: plt.Axes, rows: Sequence[Mapping[str, Any]]) -> None:
    """Per model, the MAC reduction (baseline MACs / model MACs: the speed-up the count
    promises) beside the measured speed-up (baseline median / model median) per batch size."""
    batches = [b["batch"] for b in rows[0]["latency"]["batches"]]
    series = [("MACs: baseline / model (theory)", [float(r["mac_speedup"]) for r in rows],
               "0.6", "//")]
    shades = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")
    for k, b in enumerate(batches):
        series.append((f"measured, batch {b}",
                       [float(r["latency"]["batches"][k].get("speedup") or 0.0) for r in rows],
                       shades[k % len(shades)], None))
    xs = np.arange(len(rows))
    step = 0.8 / len(series)
    top = max(1.0, *(v for _, vals, _, _ in series for v in vals))
    for k, (name, vals, color, hatch) in enumerate(series):
        pos = xs - 0.4 + step * (k + 0.5)
        ax.bar(pos, vals, width=step * 0.95, color=color, hatch=hatch, edgecolor="black",
               linewidth=0.5, label=name)
        for x, v in zip(pos, vals):
            ax.annotate(f"{v:.2f}×", xy=(x, v), xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize=7, rotation=90 if len(series) > 3
                        else 0)
    ax.axhline(1.0, color="0.3", ls="--", lw=1, label="baseline speed")
    low = min(v for _, vals, _, _ in series for v in vals if v > 0) if top > 0 else 1.0
    if top / max(low, 1e-9) > 20:  # e.g. 84× beside 3×: a log axis keeps both readable
        ax.set_yscale("log")
        ax.set_ylim(min(0.5, low / 2), top * 30)  # headroom for the legend
    else:
        ax.set_ylim(0, top * 1.6)  # headroom for the legend
    labels = [str(r["label"]) for r in rows]
    rotate = len(labels) > 2 or max(len(s) for s in labels) > 12  # as the other panels
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, fontsize=9, rotation=25 if rotate else 0,
                       ha="right" if rotate else "center")
    ax.set_ylabel("× faster than the baseline")
    ax.set_title("measured speed-up\nvs MAC reduction")  # one line ran past the figure
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(loc="upper left", fontsize=8)


def _acc_panel(ax: plt.Axes, rows: Sequence[Mapping[str, Any]], base: Mapping[str, Any],
               labels: list[str], colors: list[str]) -> None:
    base_acc = base.get("best_acc")
    values, texts = [], []
    for r in rows:
        acc = r.get("best_acc")
        if acc is None:
            values.append(0.0)
            texts.append("n/a")
            continue
        values.append(float(acc))
        if r is base:
            texts.append(f"{acc:.2f}%\nbaseline")
        elif base_acc is None:
            texts.append(f"{acc:.2f}%")
        else:
            texts.append(f"{acc:.2f}%\n{acc - base_acc:+.2f} pts")
    _bars(ax, labels, values, texts, colors, ymax=100.0)
    ax.set_yticks(range(0, 101, 20))  # the headroom above 100% is for labels only
    ax.set_ylabel("best test accuracy (%)")
    ax.set_title("best test accuracy (%)")


def _bars(ax: plt.Axes, labels: list[str], values: list[float], texts: list[str],
          colors: list[str], ymax: float | None = None) -> None:
    """Bars with a value label above each; room left on top so labels never clip."""
    xs = np.arange(len(values))
    ax.bar(xs, values, color=colors, width=0.65, edgecolor="black", linewidth=0.5)
    top = max(values + [ymax or 0.0, 1e-9])
    ax.set_ylim(0, top * 1.22)
    for x, v, t in zip(xs, values, texts):
        ax.annotate(t, xy=(x, v), xytext=(0, 3), textcoords="offset points", ha="center",
                    va="bottom", fontsize=9)
    ax.set_xticks(xs)
    rotate = len(labels) > 3 or max(len(s) for s in labels) > 12
    ax.set_xticklabels(labels, rotation=25 if rotate else 0, ha="right" if rotate else "center",
                       fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


# prune --criterion -> colour of its line in the accuracy-vs-MACs figure
CRITERION_COLORS = {"bn": "#1f77b4", "l1": "#ff7f0e", "l2": "#2ca02c", "random": "#7f7f7f",
                    "taylor": "#9467bd"}
ALLOCATION_STYLES = {"global": ("-", "o"), "uniform": ("--", "s")}
ACC_PANELS = (("acc_after", "right after pruning\n(adaptive BN)"),
              ("best_acc", "after fine-tuning"), ("scratch_acc", "trained from scratch"))


def plot_accuracy_vs_macs(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, *,
                          title: str, baseline: Mapping[str, Any] | None = None) -> Path:
    """Test accuracy (%) against MACs (M): one line per criterion (colour) and allocation
    (solid: global, dashed: uniform), one panel per stage that has numbers (right after
    pruning, fine-tuned, from scratch). ``rows`` have ``criterion``, ``allocation``, ``macs``
    and the accuracies (``acc_after``, ``best_acc``, ``scratch_acc``; with ``<key>_std``: error
    bars); ``baseline`` (``macs``, ``best_acc``): the unpruned model, a star and a line."""
    panels = [(k, name) for k, name in ACC_PANELS if any(r.get(k) is not None for r in rows)]
    if not panels:
        raise ValueError("no accuracies to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), sharey=True,
                             squeeze=False)
    for ax, (key, name) in zip(axes[0], panels):
        _criterion_lines(ax, rows, key)
        if baseline and baseline.get("best_acc") is not None:
            ax.axhline(baseline["best_acc"], color="0.4", ls=":", lw=1)
            ax.plot([baseline["macs"] / 1e6], [baseline["best_acc"]], marker="*", ms=13,
                    color="gold", mec="black", ls="none", label="unpruned")
        ax.set_title(name)
        ax.set_xlabel("MACs (millions)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=12)
    return _save(fig, path)


def _criterion_lines(ax: plt.Axes, rows: Sequence[Mapping[str, Any]], key: str) -> None:
    """One line per (criterion, allocation) through its rows' (MACs, ``key``), by MACs."""
    series: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        if r.get(key) is not None and r.get("macs"):
            series.setdefault((r.get("criterion", "bn"), r.get("allocation", "global")),
                              []).append(r)
    for (criterion, allocation), points in series.items():
        points = sorted(points, key=lambda r: r["macs"])
        ls, marker = ALLOCATION_STYLES.get(allocation, ("-.", "^"))
        stds = [r.get(f"{key}_std") for r in points]
        ax.errorbar([r["macs"] / 1e6 for r in points], [r[key] for r in points],
                    yerr=None if None in stds else stds, ls=ls, marker=marker, capsize=3,
                    color=CRITERION_COLORS.get(criterion, "black"),
                    label=f"{criterion}, {allocation}")


def plot_sweep(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, *, title: str) -> Path:
    """A sweep's points: test accuracy (%) after fine-tuning against params (M), and against
    MACs (M) where known; one line per point (``point``) through its targets."""
    keys = [k for k in ("params", "macs") if any(r.get(k) for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(5.6 * len(keys), 4.6), sharey=True,
                             squeeze=False)
    for ax, key in zip(axes[0], keys):
        series: dict[str, list[Mapping[str, Any]]] = {}
        for r in rows:
            if r.get(key) and r.get("best_acc") is not None:
                series.setdefault(r["point"], []).append(r)
        for point, pts in series.items():
            pts = sorted(pts, key=lambda r: r[key])
            ax.plot([r[key] / 1e6 for r in pts], [r["best_acc"] for r in pts], marker="o",
                    label=point)
        ax.set_xlabel(f"{'params' if key == 'params' else 'MACs'} (millions)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("best test accuracy after fine-tuning (%)")
    axes[0][-1].legend(loc="best", fontsize=8)
    fig.suptitle(title, fontsize=12)
    return _save(fig, path)

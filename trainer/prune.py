"""Network-slimming channel pruning by BatchNorm |γ|, one rule for every architecture.

The reference rule: sort the |γ| of the N channels in scope (``all``: every BatchNorm;
``prunable``: the BatchNorms the architecture prunes) and take the value at position
floor(N * ratio) as one global threshold; channels of prunable units with |γ| strictly above it
are kept; no unit keeps fewer than ``min_channels`` (its largest |γ|), and with ``round_to`` K
each keeps a multiple of K (at least K, at most all), its largest |γ|. A unit is a BatchNorm
or, for a torchvision model, a coupled channel group (see trainer.tvmodels). The family of the
model's architecture builds the smaller network and copies the kept weights.

A budget (``prune_to_budget``) picks the threshold instead: the smallest one whose model has at
most the budget's params or MACs, by bisection over the sorted |γ| values (the count never
grows as the threshold rises: masks only shrink, and min-channels and round-to are monotone).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.archs import get_arch
from trainer.checks import check_ratio, check_scope
from trainer.errors import CheckpointError, ConfigError
from trainer.models import family
from trainer.paths import fmt_count
from trainer.progress import console, say
from trainer.slim import Unit, count_params, unwrap_model


@dataclass
class PruneResult:
    model: nn.Module
    widths: Any
    threshold: float
    masks: list[torch.Tensor]
    units: list[Unit] = field(default_factory=list)
    kept_min: list[str] = field(default_factory=list)  # units saved by --min-channels
    ties: int = 0  # channels whose |γ| equals the threshold (all removed: "strictly above")
    params_before: int = 0
    params_after: int = 0
    ratio: float | None = None  # the ratio asked, or the one a budget chose
    budget: dict[str, Any] | None = None  # kind, target, before, reached

    @property
    def removed_fraction(self) -> float:
        """The share of the prunable units' channels that went."""
        pairs = [(int(m.sum()), m.numel()) for u, m in zip(self.units, self.masks)
                 if u.prunable]
        return 1 - sum(k for k, _ in pairs) / max(sum(t for _, t in pairs), 1)


def units_of(model: nn.Module) -> list[Unit]:
    bare = unwrap_model(model)
    return family(bare.arch).units(bare)


def _in_scope(units: list[Unit], scope: str) -> torch.Tensor:
    check_scope(scope)
    return torch.cat([u.gamma for u in units if scope == "all" or u.prunable])


def all_gammas(model: nn.Module, scope: str = "all") -> torch.Tensor:
    """|γ| of every channel in ``scope`` ("all" BatchNorms or the "prunable" ones)."""
    return _in_scope(units_of(model), scope)


def threshold_of(units: list[Unit], ratio: float, scope: str = "all") -> float:
    """The |γ| value at position floor(N * ratio) of the sorted |γ| (reference rule)."""
    check_ratio(ratio)
    gammas = _in_scope(units, scope)
    if not torch.isfinite(gammas).all():
        raise CheckpointError("BatchNorm gamma values are not finite (a diverged run?); "
                              "prune a checkpoint from a run whose loss stayed finite")
    return float(torch.sort(gammas).values[int(len(gammas) * ratio)])


def global_threshold(model: nn.Module, ratio: float, scope: str = "all") -> float:
    return threshold_of(units_of(model), ratio, scope)


def masks_of(units: list[Unit], threshold: float, min_channels: int = 1,
             round_to: int = 1) -> tuple[list[torch.Tensor], list[str]]:
    """Keep-masks per unit and the units that --min-channels rescued."""
    masks, rescued = [], []
    for unit in units:
        gamma = unit.gamma
        if not unit.prunable:
            masks.append(torch.ones_like(gamma, dtype=torch.bool))
            continue
        mask = gamma > threshold
        kept = int(mask.sum())
        want = max(kept, min_channels)
        if round_to > 1:  # a multiple of K, at least K, at most the whole layer
            want = min(len(gamma), round_to * max(1, math.ceil(want / round_to)))
        if want == 0:
            raise ConfigError(f"the threshold {threshold:.4g} removes every channel of "
                              f"{unit.name}; lower --ratio or keep --min-channels at 1 or more")
        if want > kept:  # the largest |γ|: a superset of those above the threshold
            if kept < min_channels:
                rescued.append(unit.name)
            mask = torch.zeros_like(mask)
            mask[torch.topk(gamma, min(want, len(gamma))).indices] = True
        masks.append(mask)
    return masks, rescued


def channel_masks(model: nn.Module, threshold: float,
                  min_channels: int = 1) -> tuple[list[torch.Tensor], list[str]]:
    return masks_of(units_of(model), threshold, min_channels)


def apply_masks(model: nn.Module, masks: list[torch.Tensor]) -> nn.Module:
    """A new, smaller model with the kept channels' weights (the family's rule)."""
    bare = unwrap_model(model)
    return family(bare.arch).apply(bare, masks)


def prune(model: nn.Module, ratio: float, *, scope: str = "all", min_channels: int = 1,
          round_to: int = 1) -> PruneResult:
    """Prune ``model`` at ``ratio`` with one global |γ| threshold."""
    _check_floors(min_channels, round_to)
    units = units_of(model)
    result = _prune_at(model, units, threshold_of(units, ratio, scope), scope, min_channels,
                       round_to)
    result.ratio = ratio
    return result


def _check_floors(min_channels: int, round_to: int) -> None:
    if min_channels < 0:
        raise ConfigError(f"--min-channels {min_channels} is negative; use 0 or more")
    if round_to < 1:
        raise ConfigError(f"--round-to {round_to}: use 1 (off) or more, e.g. 8")


def _prune_at(model: nn.Module, units: list[Unit], threshold: float, scope: str,
              min_channels: int, round_to: int) -> PruneResult:
    masks, rescued = masks_of(units, threshold, min_channels, round_to)
    new = apply_masks(model, masks)
    ties = int((_in_scope(units, scope) == threshold).sum())
    return PruneResult(model=new, widths=new.widths, threshold=threshold, masks=masks,
                       units=units, kept_min=rescued, ties=ties,
                       params_before=count_params(unwrap_model(model)),
                       params_after=count_params(new))


def model_size(model: nn.Module, kind: str, input_size: int = 32) -> int:
    """Params (the weights a checkpoint holds) or thop's MACs at 1x3xSxS, on the model's own
    device (a meta-device model counts without weights)."""
    if kind == "params":
        return count_params(model)
    import thop

    device = next(model.parameters()).device
    with torch.no_grad():
        macs, _ = thop.profile(model.eval(), inputs=(torch.zeros(1, 3, input_size, input_size,
                                                                 device=device),), verbose=False)
    return round(float(macs))


def prune_to_budget(model: nn.Module, target: int, kind: str = "params", *, scope: str = "all",
                    min_channels: int = 1, round_to: int = 1,
                    input_size: int = 32) -> PruneResult:
    """The least-pruned model with at most ``target`` params (or MACs): the smallest threshold
    whose pruned model meets it (ties: a threshold removes every channel equal to it, so the
    candidates are the distinct |γ| values; --min-channels and --round-to are applied to each
    candidate, as they will be to the result)."""
    _check_floors(min_channels, round_to)
    bare = unwrap_model(model)
    units, fam = units_of(bare), family(bare.arch)
    before = model_size(copy_to_meta(bare), kind, input_size)
    flag = f"--target-{kind} {fmt_count(target)}"
    if before <= target:
        raise ConfigError(f"{flag}: the unpruned model already has {before:,} {kind}; nothing "
                          "to prune: give a smaller budget")
    values = torch.unique(_in_scope(units, scope))  # sorted
    if not torch.isfinite(values).all():
        raise CheckpointError("BatchNorm gamma values are not finite (a diverged run?); "
                              "prune a checkpoint from a run whose loss stayed finite")

    def size(i: int) -> int:
        masks, _ = masks_of(units, float(values[i]), min_channels, round_to)
        return model_size(fam.shape(bare, masks), kind, input_size)

    lo, hi = 0, len(values) - 1
    smallest = size(hi)
    if smallest > target:
        raise ConfigError(f"{flag} cannot be met: with every prunable layer at its floor "
                          f"(--min-channels {min_channels}, --round-to {round_to}) the model has "
                          f"{smallest:,} {kind}; give a larger budget")
    while lo < hi:  # the smallest index whose model fits; size(hi) always fits
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if size(mid) <= target else (mid + 1, hi)
    result = _prune_at(bare, units, float(values[lo]), scope, min_channels, round_to)
    ranked = torch.sort(_in_scope(units, scope)).values
    result.ratio = int(torch.searchsorted(ranked, values[lo])) / len(ranked)
    result.budget = {"kind": kind, "target": target, "before": before,
                     "reached": model_size(copy_to_meta(result.model), kind, input_size)}
    return result


def copy_to_meta(model: nn.Module) -> nn.Module:
    """The model's structure on the meta device (torchvision: a CPU copy), for counting."""
    import copy

    if get_arch(model.arch).family == "torchvision":
        return copy.deepcopy(model).cpu()
    with torch.device("meta"):
        return family(model.arch).build(model.arch, model.num_classes, model.widths)


def stage_summary(result: PruneResult) -> list[tuple[str, int, int]]:
    """(stage, kept, total) of the prunable channels of each stage, in order."""
    arch = result.model.arch
    rows: dict[str, list[int]] = {}
    for unit, mask in zip(result.units, result.masks):
        if unit.prunable:
            row = rows.setdefault(family(arch).stage(arch, unit.name), [0, 0])
            row[0] += int(mask.sum())
            row[1] += mask.numel()
    return [(stage, kept, total) for stage, (kept, total) in rows.items()]


def print_prune_summary(result: PruneResult, meta: dict, output: Path, gamma_png: Path) -> None:
    """The table of kept channels per stage, params and accuracy, and notes on surprises."""
    from rich.table import Table

    table = Table(title=f"pruned {Path(meta['source']).name} ({result.model.arch}) at ratio "
                        f"{meta['ratio']:.4g}")
    for col in ("stage", "kept / total (prunable)", "kept %"):
        table.add_column(col, justify="right")
    for stage, kept, total in stage_summary(result):
        table.add_row(stage, f"{kept} / {total}", f"{100 * kept / total:.1f}%")
    before, after = meta["params_before"], meta["params_after"]
    table.add_section()
    table.add_row("params", f"{before:,} -> {after:,}", f"{100 * after / before:.1f}%")
    table.add_row("threshold |γ|", f"{meta['threshold']:.6g}", f"scope {meta['scope']}")
    if meta["acc_before"] is not None:
        table.add_row("test acc", f"{meta['acc_before']:.2f}% -> {meta['acc_after']:.2f}%",
                      "right after")
    if result.budget:
        b = result.budget
        table.add_row(f"{b['kind']} budget", f"{b['before']:,} -> {b['reached']:,}",
                      f"≤ {fmt_count(b['target'])}")
    console.print(table)
    _print_notes(result, meta)
    say(f"wrote {output} and {gamma_png}")


def _print_notes(result: PruneResult, meta: dict) -> None:
    removed, ratio = result.removed_fraction, meta["ratio"]
    asked = (f"budget {fmt_count(result.budget['target'])} {result.budget['kind']}: ratio "
             f"{ratio:.4g} chosen" if result.budget else f"asked: ratio {ratio:g}")
    rounding = f", round-to {meta['round_to']}" if meta.get("round_to", 1) > 1 else ""
    say(f"removed {100 * removed:.1f}% of the prunable channels ({asked}, scope "
        f"{meta['scope']}{rounding})")
    if meta["scope"] == "all" and removed < 0.5 * ratio:
        # e.g. the lab's bn3 holds 2/3 of all channels and is never pruned: when its γ are
        # the smallest (zero-initialised, short training), the threshold lands among them.
        say("[yellow]note:[/] the threshold fell among the γ of BatchNorms that are never "
            "pruned (the stem and each block's output BN); --scope prunable ranks the "
            "pruned ones only")
    if result.ties > 1 and removed > ratio + 0.02:
        # e.g. γ that only the L1 term moved, by the same steps: equal to many digits
        say(f"[yellow]note:[/] {result.ties} channels have |γ| equal to the threshold and are "
            f"removed with it (only |γ| strictly above is kept), so {100 * removed:.1f}% of the "
            f"prunable channels went at ratio {ratio:g}; train longer or lower --ratio")
    if result.kept_min:
        say(f"[yellow]note:[/] the threshold would have emptied {len(result.kept_min)} "
            f"layer(s); kept their {meta['min_channels']} largest-|γ| channel(s): "
            f"{', '.join(result.kept_min)}")

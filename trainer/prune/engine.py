"""Network-slimming channel pruning by BatchNorm |γ|, one rule for every architecture.

The reference rule: sort the |γ| of the N channels in scope (``all``: every BatchNorm;
``prunable``: the BatchNorms the architecture prunes) and take the value at position
floor(N * ratio) as one global threshold; channels of prunable units with |γ| strictly above it
are kept; no unit keeps fewer than ``min_channels`` (its largest |γ|), and with ``round_to`` K
each keeps a multiple of K (at least K, at most all), its largest |γ|. A unit is a BatchNorm
or, for a dependency-graph model, a coupled channel group (see trainer.models.graph). The family
of the model's architecture builds the smaller network and copies the kept weights.

A budget (``prune_to_budget``) picks the threshold instead: the smallest one whose model has at
most the budget's params or MACs, by bisection over the sorted |γ| values (the count never
grows as the threshold rises: masks only shrink, and min-channels and round-to are monotone).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import thop
import torch
from torch import nn

from trainer.config.checks import check, check_ratio
from trainer.config.paths import fmt_count
from trainer.errors import CheckpointError, ParamError
from trainer.models.build import family
from trainer.models.family import Unit, count_params, unwrap_model
from trainer.prune.record import PruneRecord


@dataclass
class PruneResult:
    """The pruned model, the keep-mask of every unit, the units, and the record of it all."""

    model: nn.Module
    masks: list[torch.Tensor]
    units: list[Unit]
    record: PruneRecord


def units_of(model: nn.Module) -> list[Unit]:
    bare = unwrap_model(model)
    return family(bare.arch).units(bare)


def _in_scope(units: list[Unit], scope: str) -> torch.Tensor:
    check("scope", scope)
    return torch.cat([u.gamma for u in units if scope == "all" or u.prunable])


def _finite(values: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(values).all():
        raise CheckpointError("BatchNorm gamma values are not finite (a diverged run?); "
                              "prune a checkpoint from a run whose loss stayed finite")
    return values


def all_gammas(model: nn.Module, scope: str = "all") -> torch.Tensor:
    """|γ| of every channel in ``scope`` ("all" BatchNorms or the "prunable" ones)."""
    return _in_scope(units_of(model), scope)


def threshold_of(units: list[Unit], ratio: float, scope: str = "all") -> float:
    """The |γ| value at position floor(N * ratio) of the sorted |γ| (reference rule)."""
    check_ratio(ratio)
    gammas = _finite(_in_scope(units, scope))
    return float(torch.sort(gammas).values[int(len(gammas) * ratio)])


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
            raise ParamError(f"the threshold {threshold:.4g} removes every channel of "
                             f"{unit.name}; lower {{ratio}} or keep {{min_channels}} at 1 or "
                             "more", "ratio", "min_channels")
        if want > kept:  # the largest |γ|: a superset of those above the threshold
            if kept < min_channels:
                rescued.append(unit.name)
            mask = torch.zeros_like(mask)
            mask[torch.topk(gamma, min(want, len(gamma))).indices] = True
        masks.append(mask)
    return masks, rescued


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
    result.record.ratio = ratio
    return result


def _check_floors(min_channels: int, round_to: int) -> None:
    check("min_channels", min_channels)
    check("round_to", round_to)


def _prune_at(model: nn.Module, units: list[Unit], threshold: float, scope: str,
              min_channels: int, round_to: int) -> PruneResult:
    masks, rescued = masks_of(units, threshold, min_channels, round_to)
    new = apply_masks(model, masks)
    pairs = [(int(m.sum()), m.numel()) for u, m in zip(units, masks) if u.prunable]
    record = PruneRecord(
        threshold=threshold, scope=scope, min_channels=min_channels, round_to=round_to,
        params_before=count_params(unwrap_model(model)), params_after=count_params(new),
        removed_fraction=1 - sum(k for k, _ in pairs) / max(sum(n for _, n in pairs), 1),
        ties=int((_in_scope(units, scope) == threshold).sum()), min_channels_kept=rescued)
    result = PruneResult(new, masks, units, record)
    record.stages = [list(row) for row in stage_summary(result)]
    return result


def model_size(model: nn.Module, kind: str, input_size: int = 32) -> int:
    """Params (the weights a checkpoint holds) or thop's MACs at 1x3xSxS, on the model's own
    device (a meta-device model counts without weights)."""
    if kind == "params":
        return count_params(model)
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
    param = f"target_{kind}"
    flag = f"{{{param}}} {fmt_count(target)}"
    if before <= target:
        raise ParamError(f"{flag}: the unpruned model already has {before:,} {kind}; nothing "
                         "to prune: give a smaller budget", param)
    values = _finite(torch.unique(_in_scope(units, scope)))  # sorted

    def size(i: int) -> int:
        masks, _ = masks_of(units, float(values[i]), min_channels, round_to)
        return model_size(fam.shape(bare, masks), kind, input_size)

    lo, hi = 0, len(values) - 1
    smallest = size(hi)
    if smallest > target:
        raise ParamError(f"{flag} cannot be met: with every prunable layer at its floor "
                         f"({{min_channels}} {min_channels}, {{round_to}} {round_to}) the model "
                         f"has {smallest:,} {kind}; give a larger budget", param,
                         "min_channels", "round_to")
    while lo < hi:  # the smallest index whose model fits; size(hi) always fits
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if size(mid) <= target else (mid + 1, hi)
    result = _prune_at(bare, units, float(values[lo]), scope, min_channels, round_to)
    ranked = torch.sort(_in_scope(units, scope)).values
    result.record.ratio = int(torch.searchsorted(ranked, values[lo])) / len(ranked)
    result.record.budget = {"kind": kind, "target": target, "before": before,
                            "reached": model_size(copy_to_meta(result.model), kind, input_size)}
    return result


def copy_to_meta(model: nn.Module) -> nn.Module:
    """The model's structure without its weights where its family can, for counting."""
    return family(model.arch).skeleton_of(model)


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

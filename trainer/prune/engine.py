"""Network-slimming channel pruning by BatchNorm |γ| (or another criterion's score), one rule
for every architecture.

The reference rule (``allocation="global"``): sort the scores of the N channels in scope
(``all``: every BatchNorm; ``prunable``: the BatchNorms the architecture prunes) and take the
value at position floor(N * ratio) as one global threshold; channels of prunable units scoring
strictly above it are kept; no unit keeps fewer than ``min_channels`` (its best-scoring), and
with ``round_to`` K each keeps a multiple of K (at least K, at most all), its best-scoring. A
unit is a BatchNorm or, for a dependency-graph model, a coupled channel group (see
trainer.models.graph); the scores are its channels' |γ| (``criterion="bn"``) or another
criterion's (trainer.prune.criteria). The family of the model's architecture builds the smaller
network and copies the kept weights.

``allocation="uniform"``: every prunable unit of C live channels loses its ⌊ratio·C⌋ lowest-
scoring ones (ties: the lower index is kept), within the same min-channels and round-to.

A budget (``prune_to_budget``) picks the threshold instead: the smallest one whose model has at
most the budget's params or MACs, by bisection over the sorted scores (the count never grows as
the threshold rises: masks only shrink, and min-channels and round-to are monotone); uniformly,
the smallest ratio k/C (some unit's step) whose model fits, by bisection the same way.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass

import thop
import torch
from torch import nn

from trainer.config.checks import check, check_ratio
from trainer.config.paths import fmt_count
from trainer.errors import CheckpointError, ParamError
from trainer.models.build import family
from trainer.models.family import Unit, count_params, unwrap_model
from trainer.prune.criteria import score_units
from trainer.prune.record import PruneRecord


@dataclass
class PruneResult:
    """The pruned model, the keep-mask of every unit, the units, and the record of it all."""

    model: nn.Module
    masks: list[torch.Tensor]
    units: list[Unit]
    record: PruneRecord


def units_of(model: nn.Module, criterion: str = "bn", *, seed: int = 0,
             batches: Iterable | None = None, ignore: Collection[str] = ()) -> list[Unit]:
    """Every unit of ``model`` with its channels' scores: |γ|, or ``criterion``'s
    (trainer.prune.criteria.score_units); the units that would change a layer named in
    ``ignore`` are not prunable."""
    units = score_units(model, criterion, seed=seed, batches=batches)
    frozen = family(unwrap_model(model).arch).frozen(unwrap_model(model), set(ignore))
    return [u._replace(prunable=False) if u.name in frozen else u for u in units]


def _in_scope(units: list[Unit], scope: str) -> torch.Tensor:
    check("scope", scope)
    return torch.cat([u.score for u in units if scope == "all" or u.prunable])


def scores_of(units: list[Unit], scope: str = "all") -> torch.Tensor:
    """The scores of every channel in ``scope``, unit by unit (what the threshold ranks)."""
    return _in_scope(units, scope)


def _finite(values: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(values).all():
        raise CheckpointError("BatchNorm gamma values (or the criterion's channel scores) are "
                              "not finite (a diverged run?); prune a checkpoint from a run whose "
                              "loss stayed finite")
    return values


def all_gammas(model: nn.Module, scope: str = "all") -> torch.Tensor:
    """|γ| of every channel in ``scope`` ("all" BatchNorms or the "prunable" ones)."""
    return _in_scope(units_of(model), scope)


def threshold_of(units: list[Unit], ratio: float, scope: str = "all") -> float:
    """The score at position floor(N * ratio) of the sorted scores (reference rule)."""
    check_ratio(ratio)
    gammas = _finite(_in_scope(units, scope))
    return float(torch.sort(gammas).values[int(len(gammas) * ratio)])


def masks_of(units: list[Unit], threshold: float, min_channels: int = 1,
             round_to: int = 1) -> tuple[list[torch.Tensor], list[str]]:
    """Keep-masks per unit (scores strictly above ``threshold``) and the units that
    --min-channels rescued."""
    masks, rescued = [], []
    for unit in units:
        score = unit.score
        if not unit.prunable:
            masks.append(torch.ones_like(score, dtype=torch.bool))
            continue
        mask = score > threshold
        kept = int(mask.sum())
        want = _floored(kept, len(score), min_channels, round_to)
        if want == 0:
            raise ParamError(f"the threshold {threshold:.4g} removes every channel of "
                             f"{unit.name}; lower {{ratio}} or keep {{min_channels}} at 1 or "
                             "more", "ratio", "min_channels")
        if want > kept:  # the largest scores: a superset of those above the threshold
            if kept < min_channels:
                rescued.append(unit.name)
            mask = torch.zeros_like(mask)
            mask[torch.topk(score, min(want, len(score))).indices] = True
        masks.append(mask)
    return masks, rescued


def _floored(kept: int, channels: int, min_channels: int, round_to: int) -> int:
    """``kept`` raised to ``min_channels`` and, with ``round_to`` K, to a multiple of K (at
    least K, at most the whole layer)."""
    want = max(kept, min_channels)
    if round_to > 1:
        want = min(channels, round_to * max(1, math.ceil(want / round_to)))
    return want


def removed_count(ratio: float, channels: int) -> int:
    """⌊ratio·C⌋, to within 1e-9 (so that 1/49 of 49 channels is 1, not 0)."""
    return math.floor(ratio * channels + 1e-9)


def uniform_masks(units: list[Unit], ratio: float, min_channels: int = 1,
                  round_to: int = 1) -> tuple[list[torch.Tensor], list[str]]:
    """Keep-masks removing the ⌊ratio·C⌋ lowest-scoring of the C channels of every prunable
    unit (within min-channels and round-to; ties: the lower index is kept), and the units that
    --min-channels rescued."""
    masks, rescued = [], []
    for unit in units:
        channels = len(unit.score)
        mask = torch.ones(channels, dtype=torch.bool)
        if unit.prunable:
            kept = channels - removed_count(ratio, channels)
            want = _floored(kept, channels, min_channels, round_to)
            if kept < min_channels:
                rescued.append(unit.name)
            mask[torch.argsort(unit.score, descending=True, stable=True)[want:]] = False
        masks.append(mask)
    return masks, rescued


def apply_masks(model: nn.Module, masks: list[torch.Tensor]) -> nn.Module:
    """A new, smaller model with the kept channels' weights (the family's rule)."""
    bare = unwrap_model(model)
    return family(bare.arch).apply(bare, masks)


def prune(model: nn.Module, ratio: float, *, scope: str = "all", min_channels: int = 1,
          round_to: int = 1, criterion: str = "bn", allocation: str = "global", seed: int = 0,
          batches: Iterable | None = None, ignore: Collection[str] = ()) -> PruneResult:
    """Prune ``model`` at ``ratio``: one global threshold on the ``criterion``'s scores (bn:
    |γ|), or with ``allocation="uniform"`` ⌊ratio·C⌋ channels of every prunable unit.
    ``seed``: the random criterion's; ``batches``: (images, labels) the taylor criterion
    scores on (trainer.prune.criteria); ``ignore``: layers to leave whole (:func:`units_of`)."""
    _check_choices(min_channels, round_to, criterion, allocation, scope)
    check_ratio(ratio)
    units = units_of(model, criterion, seed=seed, batches=batches, ignore=ignore)
    if allocation == "uniform":
        result = _pruned(model, units, *uniform_masks(units, ratio, min_channels, round_to),
                         None, scope, min_channels, round_to)
    else:
        result = _prune_at(model, units, threshold_of(units, ratio, scope), scope, min_channels,
                           round_to)
    result.record.ratio = ratio
    result.record.criterion, result.record.allocation = criterion, allocation
    return result


def _check_floors(min_channels: int, round_to: int) -> None:
    check("min_channels", min_channels)
    check("round_to", round_to)


def _check_choices(min_channels: int, round_to: int, criterion: str, allocation: str,
                   scope: str) -> None:
    _check_floors(min_channels, round_to)
    for param, value in (("criterion", criterion), ("allocation", allocation),
                         ("scope", scope)):
        check(param, value)


def _prune_at(model: nn.Module, units: list[Unit], threshold: float, scope: str,
              min_channels: int, round_to: int) -> PruneResult:
    masks, rescued = masks_of(units, threshold, min_channels, round_to)
    return _pruned(model, units, masks, rescued, threshold, scope, min_channels, round_to)


def _pruned(model: nn.Module, units: list[Unit], masks: list[torch.Tensor], rescued: list[str],
            threshold: float | None, scope: str, min_channels: int,
            round_to: int) -> PruneResult:
    """The model the masks leave and the record of it (``threshold`` None: uniform)."""
    new = apply_masks(model, masks)
    pairs = [(int(m.sum()), m.numel()) for u, m in zip(units, masks) if u.prunable]
    ties = 0 if threshold is None else int((_in_scope(units, scope) == threshold).sum())
    record = PruneRecord(
        threshold=threshold, scope=scope, min_channels=min_channels, round_to=round_to,
        params_before=count_params(unwrap_model(model)), params_after=count_params(new),
        removed_fraction=1 - sum(k for k, _ in pairs) / max(sum(n for _, n in pairs), 1),
        ties=ties, min_channels_kept=rescued)
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
                    min_channels: int = 1, round_to: int = 1, input_size: int = 32,
                    criterion: str = "bn", allocation: str = "global", seed: int = 0,
                    batches: Iterable | None = None, ignore: Collection[str] = ()
                    ) -> PruneResult:
    """The least-pruned model with at most ``target`` params (or MACs): the smallest threshold
    whose pruned model meets it (ties: a threshold removes every channel equal to it, so the
    candidates are the distinct scores; --min-channels and --round-to are applied to each
    candidate, as they will be to the result). With ``allocation="uniform"``: the smallest
    uniform ratio that meets it (the candidates: k/C for every prunable unit's C, the ratios
    where some unit loses one more channel). ``criterion``, ``seed``, ``batches``: as
    :func:`prune`; ``ignore``: as :func:`units_of`."""
    _check_choices(min_channels, round_to, criterion, allocation, scope)
    bare = unwrap_model(model)
    before = model_size(copy_to_meta(bare), kind, input_size)
    param = f"target_{kind}"
    flag = f"{{{param}}} {fmt_count(target)}"
    if before <= target:
        raise ParamError(f"{flag}: the unpruned model already has {before:,} {kind}; nothing "
                         "to prune: give a smaller budget", param)
    units = units_of(bare, criterion, seed=seed, batches=batches, ignore=ignore)
    fam = family(bare.arch)
    if allocation == "uniform":
        steps = uniform_steps(units)

        def masks_at(i: int) -> tuple[list[torch.Tensor], list[str]]:
            return uniform_masks(units, steps[i], min_channels, round_to)
    else:
        steps = _finite(torch.unique(_in_scope(units, scope)))  # sorted

        def masks_at(i: int) -> tuple[list[torch.Tensor], list[str]]:
            return masks_of(units, float(steps[i]), min_channels, round_to)

    def size(i: int) -> int:
        return model_size(fam.shape(bare, masks_at(i)[0]), kind, input_size)

    lo, hi = 0, len(steps) - 1
    smallest = size(hi) if len(steps) else before
    if smallest > target:
        raise ParamError(f"{flag} cannot be met: with every prunable layer at its floor "
                         f"({{min_channels}} {min_channels}, {{round_to}} {round_to}) the model "
                         f"has {smallest:,} {kind}; give a larger budget", param,
                         "min_channels", "round_to")
    while lo < hi:  # the smallest index whose model fits; size(hi) always fits
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if size(mid) <= target else (mid + 1, hi)
    if allocation == "uniform":
        result = _pruned(bare, units, *masks_at(lo), None, scope, min_channels, round_to)
        result.record.ratio = steps[lo]
    else:
        result = _prune_at(bare, units, float(steps[lo]), scope, min_channels, round_to)
        ranked = torch.sort(_in_scope(units, scope)).values
        result.record.ratio = int(torch.searchsorted(ranked, steps[lo])) / len(ranked)
    result.record.criterion, result.record.allocation = criterion, allocation
    result.record.budget = {"kind": kind, "target": target, "before": before,
                            "reached": model_size(copy_to_meta(result.model), kind, input_size)}
    return result


def uniform_steps(units: list[Unit]) -> list[float]:
    """Every ratio k/C (0 < k < C, C a prunable unit's channels), rising: between two of them
    no unit's ⌊ratio·C⌋ changes."""
    sizes = {len(u.score) for u in units if u.prunable}
    return sorted({k / c for c in sizes for k in range(1, c)})


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

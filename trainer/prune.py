"""Network-slimming channel pruning of the lab ResNet-50 by BatchNorm |gamma|.

The reference rule: sort the |gamma| of all N channels of all BatchNorm2d layers (or of
bn1/bn2 only with ``scope="prunable"``) and take the value at position floor(N * ratio)
as one global threshold; bn1/bn2 channels with |gamma| strictly above it are kept. The
stem and every bn3 keep full width, so shortcuts and downsample convs stay whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.checks import check_ratio, check_scope
from trainer.errors import CheckpointError, ConfigError
from trainer.models import (
    STAGE_BLOCKS,
    ResNet50,
    batchnorms,
    count_params,
    prunable_indices,
    unwrap_model,
)
from trainer.progress import console, say


@dataclass
class PruneResult:
    model: ResNet50
    widths: list[int]
    threshold: float
    masks: list[torch.Tensor]
    kept_min: list[str] = field(default_factory=list)  # layers saved by --min-channels
    ties: int = 0  # channels whose |gamma| equals the threshold (all removed: "strictly above")
    params_before: int = 0
    params_after: int = 0


def all_gammas(model: torch.nn.Module, scope: str = "all") -> torch.Tensor:
    """|gamma| of every channel in ``scope`` ("all" BatchNorms or "prunable" bn1/bn2)."""
    bns = batchnorms(unwrap_model(model))
    keep = set(prunable_indices()) if scope == "prunable" else set(range(len(bns)))
    return torch.cat([m.weight.detach().abs().flatten().cpu()
                      for i, (_, m) in enumerate(bns) if i in keep])


def global_threshold(model: torch.nn.Module, ratio: float, scope: str = "all") -> float:
    """The |gamma| value at position floor(N * ratio) of the sorted |gamma| (reference rule)."""
    check_ratio(ratio)
    gammas = all_gammas(model, check_scope(scope))
    if not torch.isfinite(gammas).all():
        raise CheckpointError("BatchNorm gamma values are not finite (a diverged run?); "
                              "prune a checkpoint from a run whose loss stayed finite")
    return float(torch.sort(gammas).values[int(len(gammas) * ratio)])


def channel_masks(model: torch.nn.Module, threshold: float,
                  min_channels: int = 1) -> tuple[list[torch.Tensor], list[str]]:
    """Keep-masks per BatchNorm (widths order) and the layers that --min-channels rescued."""
    prunable = set(prunable_indices())
    masks, rescued = [], []
    for i, (name, m) in enumerate(batchnorms(unwrap_model(model))):
        gamma = m.weight.detach().abs().cpu()
        if i not in prunable:
            masks.append(torch.ones_like(gamma, dtype=torch.bool))
            continue
        mask = gamma > threshold
        if int(mask.sum()) < min_channels:
            if min_channels == 0:
                pass
            else:
                mask = torch.zeros_like(mask)
                mask[torch.topk(gamma, min(min_channels, len(gamma))).indices] = True
                rescued.append(name)
        if int(mask.sum()) == 0:
            raise ConfigError(f"the threshold {threshold:.4g} removes every channel of {name}; "
                              "lower --ratio or keep --min-channels at 1 or more")
        masks.append(mask)
    return masks, rescued


def apply_masks(model: torch.nn.Module, masks: list[torch.Tensor]) -> ResNet50:
    """A new ResNet50 with the kept channels' weights copied in.

    BN tensors are sliced by their mask; each conv by its BN's mask on output channels and
    by the previous mask on input channels; downsample convs, the stem, bn3 and fc whole.
    """
    src = unwrap_model(model)
    new = ResNet50(src.fc.out_features, [int(m.sum()) for m in masks])
    state = {k: v.detach().cpu().clone() for k, v in src.state_dict().items()}
    out = {}
    pos = 1  # widths index of the current block's bn1
    for stage, blocks in enumerate(STAGE_BLOCKS, start=1):
        for b in range(blocks):
            pre = f"layer{stage}.{b}."
            m1, m2 = masks[pos], masks[pos + 1]
            _slice_bn(state, out, pre + "bn1", m1)
            _slice_bn(state, out, pre + "bn2", m2)
            out[pre + "conv1.weight"] = state[pre + "conv1.weight"][m1]
            out[pre + "conv2.weight"] = state[pre + "conv2.weight"][m2][:, m1]
            out[pre + "conv3.weight"] = state[pre + "conv3.weight"][:, m2]
            pos += 3
    for key, value in state.items():
        out.setdefault(key, value)
    new.load_state_dict(out)
    return new


def _slice_bn(state: dict, out: dict, prefix: str, mask: torch.Tensor) -> None:
    for part in ("weight", "bias", "running_mean", "running_var"):
        out[f"{prefix}.{part}"] = state[f"{prefix}.{part}"][mask]
    out[f"{prefix}.num_batches_tracked"] = state[f"{prefix}.num_batches_tracked"]


def prune(model: torch.nn.Module, ratio: float, *, scope: str = "all",
          min_channels: int = 1) -> PruneResult:
    """Prune ``model`` at ``ratio`` with one global |gamma| threshold."""
    if min_channels < 0:
        raise ConfigError(f"--min-channels {min_channels} is negative; use 0 or more")
    threshold = global_threshold(model, ratio, scope)
    masks, rescued = channel_masks(model, threshold, min_channels)
    new = apply_masks(model, masks)
    ties = int((all_gammas(model, scope) == threshold).sum())
    return PruneResult(model=new, widths=new.widths, threshold=threshold, masks=masks,
                       kept_min=rescued, ties=ties, params_before=count_params(unwrap_model(model)),
                       params_after=count_params(new))


def stage_summary(masks: list[torch.Tensor]) -> list[tuple[str, int, int]]:
    """(stage, kept, total) of the bn1/bn2 channels of each stage."""
    rows, pos = [], 1
    for stage, blocks in enumerate(STAGE_BLOCKS, start=1):
        kept = total = 0
        for _ in range(blocks):
            for m in (masks[pos], masks[pos + 1]):
                kept, total = kept + int(m.sum()), total + m.numel()
            pos += 3
        rows.append((f"layer{stage}", kept, total))
    return rows


def print_prune_summary(result: PruneResult, meta: dict, output: Path, gamma_png: Path) -> None:
    """The table of kept channels per stage, params and accuracy, and notes on surprises."""
    from rich.table import Table

    table = Table(title=f"pruned {Path(meta['source']).name} at ratio {meta['ratio']:g}")
    for col in ("stage", "kept / total (bn1+bn2)", "kept %"):
        table.add_column(col, justify="right")
    rows = stage_summary(result.masks)
    for stage, kept, total in rows:
        table.add_row(stage, f"{kept} / {total}", f"{100 * kept / total:.1f}%")
    before, after = meta["params_before"], meta["params_after"]
    table.add_section()
    table.add_row("params", f"{before:,} -> {after:,}", f"{100 * after / before:.1f}%")
    table.add_row("threshold |γ|", f"{meta['threshold']:.6g}", f"scope {meta['scope']}")
    if meta["acc_before"] is not None:
        table.add_row("test acc", f"{meta['acc_before']:.2f}% -> {meta['acc_after']:.2f}%",
                      "right after")
    console.print(table)
    removed = 1 - sum(k for _, k, _ in rows) / sum(t for _, _, t in rows)
    if meta["scope"] == "all" and removed < 0.5 * meta["ratio"]:
        # bn3 holds 2/3 of all channels and is never pruned: when its γ are the smallest
        # (zero-initialised, short training), the threshold lands among them.
        say(f"[yellow]note:[/] only {100 * removed:.1f}% of the prunable (bn1/bn2) channels "
            f"were removed at ratio {meta['ratio']:g}: the threshold fell among the stem/bn3 γ, "
            "which are never pruned; --scope prunable ranks bn1/bn2 only")
    if result.ties > 1 and removed > meta["ratio"] + 0.02:
        # e.g. γ that only the L1 term moved, by the same steps: equal to many digits
        say(f"[yellow]note:[/] {result.ties} channels have |γ| equal to the threshold and are "
            f"removed with it (only |γ| strictly above is kept), so {100 * removed:.1f}% of the "
            f"prunable channels went at ratio {meta['ratio']:g}; train longer or lower --ratio")
    if result.kept_min:
        say(f"[yellow]note:[/] the threshold would have emptied {len(result.kept_min)} layer(s); "
            f"kept their {meta['min_channels']} largest-|γ| channel(s): "
            f"{', '.join(result.kept_min)}")
    say(f"wrote {output} and {gamma_png}")

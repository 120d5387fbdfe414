"""Pruning to a budget and to hardware-friendly widths (trainer.prune.engine): the budget
search returns the least-pruned model within the budget, as a brute-force scan over every
threshold finds it; --round-to K leaves multiples of K; the counts parse as people write them."""

from __future__ import annotations

import pytest
import torch

from trainer.config.checks import parse_count
from trainer.config.paths import fmt_count
from trainer.errors import ParamError
from trainer.models.build import family, new_model
from trainer.models.family import batchnorms, count_params
from trainer.prune.engine import _in_scope, masks_of, model_size, prune, prune_to_budget, units_of

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_resnet18() -> torch.nn.Module:
    """A ResNet-18 with 12 channels inside every block and seeded random |γ| (many distinct
    values, some equal), so thresholds, ties, floors and rounding all matter."""
    widths = new_model("resnet18", 10).widths
    widths = [12 if i % 2 == 1 else w for i, w in enumerate(widths)]  # each block's bn1
    torch.manual_seed(0)
    model = new_model("resnet18", 10, widths)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, bn in batchnorms(model):
            values = torch.randint(1, 40, (bn.num_features,), generator=gen).float() / 40
            bn.weight.copy_(values)
    return model


def brute_force(model, target: int, kind: str, scope: str = "all", min_channels: int = 1,
                round_to: int = 1) -> torch.nn.Module:
    """Every distinct |γ| in scope as the threshold, in rising order: the first model that fits
    (a threshold removes every channel equal to it, so no other threshold gives another
    model)."""
    units = units_of(model)
    for value in torch.unique(_in_scope(units, scope)):
        masks, _ = masks_of(units, float(value), min_channels, round_to)
        shape = family(model.arch).shape(model, masks)
        if model_size(shape, kind) <= target:
            return shape
    raise AssertionError("nothing fits")


@pytest.mark.parametrize("kind, fraction", [("params", 0.9), ("params", 0.8), ("macs", 0.85)])
@pytest.mark.parametrize("floors", [{}, {"round_to": 4}, {"min_channels": 3},
                                    {"min_channels": 2, "round_to": 3, "scope": "prunable"}])
def test_the_budget_search_finds_what_a_brute_force_scan_finds(kind, fraction, floors):
    model = small_resnet18()
    target = int(model_size(model, kind) * fraction)
    result = prune_to_budget(model, target, kind, **floors)
    want = brute_force(model, target, kind, **floors)
    assert result.model.widths == want.widths
    assert result.record.budget["reached"] == model_size(want, kind) <= target
    assert result.record.budget["reached"] == model_size(result.model, kind)
    assert result.record.budget["before"] == model_size(model, kind) > target
    # the next-smaller threshold's model would exceed the budget: nothing less pruned fits
    ranked = torch.sort(_in_scope(units_of(model), floors.get("scope", "all"))).values
    below = ranked[ranked < result.record.threshold]
    if len(below):
        position = int(torch.searchsorted(ranked, below[-1]))
        looser = prune(model, (position + 0.5) / len(ranked), **floors)
        assert model_size(looser.model, kind) > target


def test_a_budget_that_cannot_be_met_or_is_already_met_is_one_line():
    model = small_resnet18()
    with pytest.raises(ParamError, match=r"^target_params 1K cannot be met: with every "
                                         r"prunable layer at its floor \(min_channels 1"):
        prune_to_budget(model, 1000, "params")
    with pytest.raises(ParamError, match="already has .* params; nothing to prune"):
        prune_to_budget(model, count_params(model) + 1, "params")


@pytest.mark.parametrize("arch", ["resnet50", "vgg11", "densenet40"])
def test_round_to_leaves_multiples_of_k_in_every_pruned_layer(arch):
    model = new_model(arch, 10)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, bn in batchnorms(model):
            bn.weight.copy_(torch.rand(bn.num_features, generator=gen))
    result = prune(model, 0.7, round_to=8)
    for unit, mask in zip(result.units, result.masks):
        if unit.prunable:
            kept = int(mask.sum())
            assert kept == len(unit.score) or (kept % 8 == 0 and kept >= 8), (unit.name, kept)
            # the kept channels are the largest |γ|
            assert unit.score[mask].min() >= unit.score[~mask].max() if (~mask).any() else True
    assert result.record.params_after >= prune(model, 0.7).record.params_after


@pytest.mark.parametrize("text, value", [("4M", 4_000_000), ("4e6", 4_000_000),
                                         ("4000000", 4_000_000), ("2.5M", 2_500_000),
                                         ("1.2G", 1_200_000_000), ("700k", 700_000)])
def test_counts_parse_as_written(text, value):
    assert parse_count(text, "target_params") == value
    assert parse_count(fmt_count(value), "target_params") == value


@pytest.mark.parametrize("text", ["4X", "-1M", "0", "abc", ""])
def test_a_bad_count_is_one_line(text):
    with pytest.raises(ParamError, match="^target_params .* is not a positive count; write"):
        parse_count(text, "target_params")

"""``slimtune.prune``: the engine's one pruning rule (trainer.prune.engine) on any model."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from slimtune.models import Factory, example_of, named
from trainer.errors import ParamError
from trainer.models.build import family
from trainer.models.graph import GraphFamily
from trainer.prune.engine import PruneResult, model_size
from trainer.prune.engine import prune as _prune_at_ratio
from trainer.prune.engine import prune_to_budget as _prune_to_budget
from trainer.prune.record import PruneRecord

PruneReport = PruneRecord  # what prune returns beside the model (trainer.prune.record)


def prune(model: nn.Module, ratio: float | None = None, *, target_params: int | None = None,
          target_macs: int | None = None, round_to: int = 1, min_channels: int = 1,
          scope: str = "all", ignore: Sequence[str | nn.Module] = (),
          example_inputs: torch.Tensor | None = None, criterion: str = "bn",
          allocation: str = "global", seed: int = 0, batches: Iterable | None = None,
          factory: Factory | str | None = None) -> tuple[nn.Module, PruneReport]:
    """Prune ``model``'s channels by network slimming; returns ``(pruned_model, report)``.

    Give one of ``ratio`` (the fraction of the ranked channels below the global threshold, in
    (0, 1)), ``target_params`` or ``target_macs`` (the least-pruned model within the budget).
    ``round_to`` K keeps a multiple of K channels per layer, ``min_channels`` at least that
    many; ``scope`` "all" ranks every BatchNorm's |γ|, "prunable" only the pruned ones;
    ``ignore``: layers (names or modules) whose shape must not change, e.g. the first conv or
    the classifier; ``example_inputs``: one input batch to trace (and count MACs) at (default
    1x3x32x32); ``criterion``: bn (|γ|), l1, l2, random or taylor (``batches`` of (images,
    labels) to score on); ``allocation`` "uniform" removes ⌊ratio·C⌋ of every layer.

    Any ``nn.Module`` with BatchNorm2d whose channels Torch-Pruning's dependency graph can
    trace is pruned through it (residual adds, concatenations, depthwise convs: coupled
    channels go together); slimtune's own architectures by their own rule, exactly as
    ``slimtune prune`` does. The model is not changed (it gains ``arch``, ``num_classes`` and
    ``widths`` attributes if it had none); the pruned one is a new model on the same device.
    """
    how = _budget(ratio, target_params, target_macs)
    bare = named(model, factory, example_inputs)
    names = _ignored(bare, ignore)
    device = next(bare.parameters()).device
    work = bare if device.type == "cpu" else copy.deepcopy(bare).cpu()
    size = int(example_of(work).shape[-1])
    kw = {"scope": scope, "min_channels": min_channels, "round_to": round_to,
          "criterion": criterion, "allocation": allocation, "seed": seed, "batches": batches,
          "ignore": names}
    if how[0] == "ratio":
        result = _prune_at_ratio(work, how[1], **kw)
    else:
        result = _prune_to_budget(work, how[1], how[0], input_size=size, **kw)
    report = _with_macs(result, work, size)
    pruned = result.model.to(device)
    pruned.prune_record = report.to_dict()
    return pruned, report


def _budget(ratio, target_params, target_macs) -> tuple[str, float | int]:
    """('ratio' | 'params' | 'macs', value): exactly one of them given."""
    given = [(k, v) for k, v in (("ratio", ratio), ("params", target_params),
                                 ("macs", target_macs)) if v is not None]
    if len(given) != 1:
        raise ParamError("give one of {ratio}, {target_params} or {target_macs} (got "
                         f"{len(given)})", "ratio", "target_params", "target_macs")
    kind, value = given[0]
    if kind != "ratio" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ParamError.value(f"target_{kind}", value, " is not a positive integer count")
    return kind, value


def _ignored(model: nn.Module, ignore: Sequence[str | nn.Module]) -> list[str]:
    """The names of the layers in ``ignore`` (names or modules of ``model``)."""
    if isinstance(ignore, (str, nn.Module)):
        ignore = [ignore]
    by_module = {id(m): n for n, m in model.named_modules() if n}
    layers = dict(model.named_modules())
    names = []
    for item in ignore:
        name = by_module.get(id(item)) if isinstance(item, nn.Module) else item
        if not isinstance(name, str) or name not in layers or not name:
            raise ParamError.value("ignore", item if isinstance(item, str) else
                                   type(item).__name__, " is not a layer of the model; give "
                                   "names from model.named_modules() (or the modules)",
                                   quote=isinstance(item, str))
        names.append(name)
    if names and not isinstance(family(model.arch), GraphFamily):
        bns = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
        odd = next((n for n in names if n not in bns), None)
        if odd is not None:
            raise ParamError.value("ignore", odd, f": a {model.arch} leaves layers whole by "
                                   "their BatchNorm; give BatchNorm names (e.g. "
                                   f"{sorted(bns)[0]!r})", quote=True)
    return names


def _with_macs(result: PruneResult, before: nn.Module, size: int) -> PruneReport:
    """The engine's record plus MACs before and after at ``size`` x ``size``."""
    report = result.record
    report.input_size = size
    report.macs_before, report.macs_after = _macs(before, size), _macs(result.model, size)
    return report


def _macs(model: nn.Module, size: int) -> int:
    """thop's MACs of a CPU copy (a weightless copy would lose the channel selections)."""
    example = getattr(model, "example_inputs", None)
    return model_size(copy.deepcopy(model).cpu(), "macs", size) if example is None else \
        _macs_at(copy.deepcopy(model).cpu(), example.cpu())


def _macs_at(model: nn.Module, example: torch.Tensor) -> int:
    import thop

    with torch.no_grad():
        macs, _ = thop.profile(model.eval(), inputs=(example,), verbose=False)
    return round(float(macs))

"""How much each channel is worth keeping: the criteria of ``prune --criterion``.

A criterion gives every unit (``trainer.models.family.Unit``: a BatchNorm, or a coupled channel
group) one score per live channel, the larger the more worth keeping. The engine
(``trainer.prune.engine``) keeps or removes channels by these scores and nothing else, so
--min-channels, --round-to, budgets, allocations and the checkpoint format are the same for all.

- ``bn``: |γ| of the unit's BatchNorm (network slimming, Liu et al., ICCV 2017); a group: the
  mean over its BatchNorms. After sparse training |γ| is on one scale in every layer (the L1
  term pulls all of them to zero alike), so it is used as it is: today's rule, bit for bit.
- ``l1`` / ``l2``: the L1 / L2 norm of the filter that makes each channel (Li et al., "Pruning
  Filters for Efficient ConvNets", ICLR 2017): the output filter of the conv feeding the
  BatchNorm; where a channel selection keeps the BatchNorm whole (ResNet-164's bn1, DenseNet),
  the input kernels of the layer that reads the channel, the weights its removal deletes; a
  dependency-graph group: its root layer's output filters, by Torch-Pruning's
  ``GroupMagnitudeImportance`` (``group_reduction="first"``: its "standard L1-norm of the first
  layer in a group").
- ``random``: uniform in [0, 1), drawn unit by unit from a generator seeded with ``seed``: the
  same seed, the same channels, whatever else draws random numbers. (Torch-Pruning's
  ``RandomImportance`` draws from the global generator, which training moves.)
- ``taylor``: first-order Taylor expansion of the loss (Molchanov et al., ICLR 2017 and CVPR
  2019): per channel and training batch, |Σ a·∂L/∂a| over the batch's images and positions,
  ``a`` the BatchNorm's output: the first-order change of the batch loss when the channel is
  zeroed; averaged over the batches given. It is computed as |γ·∂L/∂γ + β·∂L/∂β|, the same sum
  (a = γ·x̂ + β), from one backward pass per batch in train mode, on a copy of the model; a group
  averages over its BatchNorms as ``bn`` does. (Torch-Pruning's ``TaylorImportance`` is the
  weight version, |w·∂L/∂w|, and in 1.6.1 skips BatchNorms.)

Normalisation: a filter's norm grows with its fan-in and Taylor scores with a layer's place in
the network, so these are not comparable across layers. For one global threshold the ``l1``,
``l2`` and ``taylor`` scores of each unit are divided by the unit's mean (Torch-Pruning's
``normalizer="mean"``): a channel is ranked by how it compares with its own layer's average.
``bn`` and ``random`` scores are left as they are (already on one scale). Uniform allocation
ranks within each unit only, where no normalisation changes anything.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config.checks import check
from trainer.errors import ParamError
from trainer.models.build import family
from trainer.models.family import Unit, batchnorms, unwrap_model

NORMALISED = ("l1", "l2", "taylor")  # divided by each unit's mean (see the module docstring)
# What each criterion's scores are, in figures and tables.
LABELS = {"bn": "BatchNorm |γ|", "l1": "L1 filter norm ÷ layer mean",
          "l2": "L2 filter norm ÷ layer mean", "random": "random score (seeded)",
          "taylor": "Taylor |Σ a·∂L/∂a| ÷ layer mean"}


def score_units(model: nn.Module, criterion: str = "bn", *, seed: int = 0,
                batches: Iterable | None = None) -> list[Unit]:
    """Every unit of ``model`` with its channels' ``criterion`` scores, normalised where the
    criterion needs it. ``seed``: the random criterion's; ``batches``: (images, labels) the
    taylor criterion scores on."""
    check("criterion", criterion)
    bare = unwrap_model(model)
    fam = family(bare.arch)
    if criterion == "taylor":
        per_bn = _by_module(bare, taylor_scores(bare, batches))
        units = fam.units(bare, lambda bn: per_bn[id(bn)])
    else:
        units = fam.units(bare)
    if criterion in ("l1", "l2"):
        norms = fam.filter_norms(bare, 1 if criterion == "l1" else 2)
        units = [_rescored(u, n) for u, n in zip(units, norms, strict=True)]
    elif criterion == "random":
        gen = torch.Generator().manual_seed(seed)
        units = [u._replace(score=torch.rand(len(u.score), generator=gen)) for u in units]
    if criterion in NORMALISED:
        units = [u._replace(score=per_unit_mean(u.score)) for u in units]
    return units


def _rescored(unit: Unit, score: torch.Tensor) -> Unit:
    if len(score) != len(unit.score):  # a family whose filters and units disagree: a bug
        raise RuntimeError(f"{unit.name}: {len(score)} filter norms for {len(unit.score)} "
                           "channels")
    return unit._replace(score=score)


def per_unit_mean(score: torch.Tensor) -> torch.Tensor:
    """``score`` divided by its mean over the finite values (Torch-Pruning's "mean"
    normaliser); all-zero scores stay zero, an infinite one (never pruned) stays infinite."""
    finite = score[torch.isfinite(score)]
    mean = finite.mean() if finite.numel() else torch.tensor(0.0)
    return score / mean if mean > 0 else score


def taylor_scores(model: nn.Module, batches: Iterable | None) -> dict[str, torch.Tensor]:
    """Per BatchNorm (by name): the mean over ``batches`` of |Σ a·∂L/∂a| per channel, a the
    BatchNorm's output, L the batch's mean cross-entropy; on a copy of the model in train mode
    (``model`` is left as it was). Across the processes of a job the sums are added, so every
    rank gets the same scores (and the same masks)."""
    if batches is None:
        raise ParamError("{criterion} taylor scores channels on training batches; none given "
                         "(the Python API: prune(..., batches=loader))", "criterion")
    work = copy.deepcopy(unwrap_model(model)).train()
    work.requires_grad_(False)
    bns = batchnorms(work)
    params = [p for _, bn in bns for p in (bn.weight, bn.bias)]
    for p in params:
        p.requires_grad_(True)
    sums = torch.zeros(sum(bn.num_features for _, bn in bns) + 1, dtype=torch.float64)
    for x, y in batches:
        work.to(x.device)
        loss = F.cross_entropy(work(x.float()).float(), y)
        grads = torch.autograd.grad(loss, params)
        per = [(bn.weight.detach() * grads[2 * i] + bn.bias.detach() * grads[2 * i + 1]).abs()
               for i, (_, bn) in enumerate(bns)]
        sums[:-1] += torch.cat(per).double().cpu()
        sums[-1] += 1  # the batch count
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        total = sums.to(next(work.parameters()).device)  # nccl reduces CUDA tensors only
        torch.distributed.all_reduce(total)
        sums = total.cpu()
    if sums[-1] == 0:
        raise ParamError("{criterion} taylor: the training data gave no batch", "criterion")
    means = (sums[:-1] / sums[-1]).float()
    return dict(zip([name for name, _ in bns],
                    torch.split(means, [bn.num_features for _, bn in bns]), strict=True))


def _by_module(model: nn.Module, per_name: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    """The per-name scores keyed by the identity of ``model``'s modules of those names."""
    return {id(model.get_submodule(name)): score for name, score in per_name.items()}

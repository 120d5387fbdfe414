"""Any CNN slimmed through Torch-Pruning's dependency graph: the family of models whose
layers slimtune does not know by name (``trainer.models.torchvision_zoo`` builds its models from
torchvision).

Channels that must go together (a residual stream shared by many blocks, a depthwise conv and
the pointwise conv that feeds it, a concatenation) form one *group*; the graph finds them. A
group is a unit of the global threshold: its channel importance is the mean |γ| of the group's
BatchNorms at that channel (Torch-Pruning's default group reduction; another per-BatchNorm
score the same way), so a channel is kept or removed in every layer of the group at once. Its
filter norms are its root layer's output filters' (Torch-Pruning's magnitude importance with the
``first`` group reduction: the standard L1 of Li et al. 2017). Groups without a BatchNorm (a
classifier's hidden Linear) have no γ and are not pruned.

A pruned model is saved as its pruning history (per step: the root layer's name, whether
output channels were pruned, the channel indices; plain values), which rebuilds it from the
unpruned model: the checkpoint key ``cfg`` holds it.
"""

from __future__ import annotations

import copy

import torch
import torch_pruning as tp
from torch import nn

from trainer.errors import ConfigError, cut
from trainer.models.family import (
    Family,
    Unit,
    abs_gamma,
    batchnorms,
    bn_scorer,
    check_num_classes,
)

TRACE_SIZE = 32  # px: the input side of a model built without one (CIFAR)


def trace_size(model: nn.Module) -> int:
    """The input side (px) ``model``'s graph is traced at: the run's image size, which the
    model carries from :meth:`GraphFamily.build_at` (else TRACE_SIZE)."""
    return getattr(model, "trace_size", None) or TRACE_SIZE


def graph(model: nn.Module):
    """Torch-Pruning's dependency graph of ``model``, traced on its ``example_inputs`` (set by
    the Python API's ``prune(..., example_inputs=)``), else on zeros of its trace size."""
    example, size = getattr(model, "example_inputs", None), trace_size(model)
    where = "on its example_inputs" if example is not None else f"at {size}x{size}"
    if example is None:
        example = torch.zeros(1, 3, size, size)
    else:  # on the model's device (a copy of the model may be on the meta device)
        example = example.to(next(model.parameters()).device)
    was_training = model.training
    try:
        with torch.enable_grad():  # the graph is traced through autograd: not under no_grad
            return tp.DependencyGraph().build_dependency(model.eval(), example_inputs=example,
                                                         verbose=False)
    except Exception as exc:  # noqa: BLE001 -- any tracing failure is the model's shape
        raise ConfigError(f"{model.arch}: Torch-Pruning cannot trace it {where} "
                          f"({type(exc).__name__}: {cut(exc, 160)}); network slimming needs "
                          "its dependency graph: choose another CNN (or a larger image size, "
                          "if it only runs at one)") from None
    finally:
        model.train(was_training)


def check_history(widths) -> list[list]:
    """A pruning history: [layer name, output channels?, [channel indices]] per step."""
    widths = list(widths or [])
    for i, step in enumerate(widths):
        ok = (isinstance(step, (list, tuple)) and len(step) == 3 and isinstance(step[0], str)
              and isinstance(step[1], bool) and isinstance(step[2], (list, tuple))
              and all(isinstance(j, int) and not isinstance(j, bool) and j >= 0
                      for j in step[2]))
        if not ok:
            raise ValueError(f"cfg[{i}] is {step!r:.80}; expected a pruning step "
                             "[layer name, True/False, [channel indices]]")
    return [[s[0], s[1], list(s[2])] for s in widths]


def _groups(model: nn.Module, dg) -> list[tuple[str, object]]:
    """(root layer name, group) of every group of output channels with a BatchNorm in it."""
    names = {m: n for n, m in model.named_modules()}
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]  # the classes
    out = []
    for group in dg.get_all_groups(ignored_layers=last, root_module_types=(nn.Conv2d,
                                                                           nn.Linear)):
        if any(_bn_items(dg, group)) and not _left_whole(group):
            group = _rerooted(dg, group)
            if group is not None:  # else its BatchNorms are left whole (see _ungrouped)
                out.append((names[group[0].dep.target.module], group))
    return out


def _left_whole(group) -> bool:
    """Whether ``group`` goes through a grouped, not depthwise, conv (ResNeXt, RegNet: its
    channels could only go the same in every conv group, which one global threshold does not
    keep) or a split into stored sizes (MixNet's mixed convs, Res2Net: the module splits by
    its own list, which pruning does not change); such a group is left whole."""
    for item in group:
        module = item.dep.target.module
        if isinstance(module, nn.Conv2d) and 1 < module.groups != module.in_channels:
            return True
        if item.dep.target.type in (tp.ops.OPTYPE.SPLIT, tp.ops.OPTYPE.UNBIND):
            return True
    return False


def _consistent(dg, group) -> bool:
    """Whether each root channel of ``group`` reaches a BatchNorm and is one channel: pruning
    the root's first or last channel prunes that channel of the root alone."""
    root, channels = group[0].dep.target.module, len(group[0].idxs)
    reached = {r for _, _, rs in _bn_items(dg, group) for r in rs}
    if len(reached) != channels:
        return False
    prune_out = dg.get_pruner_of_module(root).prune_out_channels
    return all(len(set(dg.get_pruning_group(root, prune_out, [i])[0].idxs)) == 1
               for i in {0, channels - 1})


def _rerooted(dg, group):
    """``group``, or the same channels rooted at another conv of it whose root channels are
    :func:`_consistent` (None if none is). A concatenation of a tensor and a function of it
    (GhostNet's cat([x, dwconv(x)])) couples channel i with i + C; rooted at a layer that sees
    both halves (an SE gate's conv, a residual stream), Torch-Pruning maps 2C root channels
    onto C, and pruning one removes its twin. Rooted at the conv that makes x, each root channel
    is one such pair."""
    if _consistent(dg, group):
        return group
    for item in group:
        module = item.dep.target.module
        if (isinstance(module, nn.Conv2d) and module is not group[0].dep.target.module
                and dg.is_out_channel_pruning_fn(item.dep.handler)):
            other = dg.get_pruning_group(module, dg.get_pruner_of_module(module)
                                         .prune_out_channels, list(range(module.out_channels)))
            if _consistent(dg, other):
                return other
    return None


def _bn_items(dg, group):
    for item in group:
        module = item.dep.target.module
        if isinstance(module, nn.BatchNorm2d) and dg.is_out_channel_pruning_fn(item.dep.handler):
            yield module, item.idxs, item.root_idxs


def _importance(dg, group, channels: int, score) -> torch.Tensor:
    """Per root channel: the mean ``score`` (|γ|) over the group's BatchNorms (inf where none
    reaches)."""
    total, count = torch.zeros(channels), torch.zeros(channels)
    for bn, idxs, roots in _bn_items(dg, group):
        total.index_add_(0, torch.tensor(roots), score(bn)[torch.tensor(idxs)])
        count.index_add_(0, torch.tensor(roots), torch.ones(len(roots)))
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, torch.inf))


def _ungrouped(model: nn.Module, dg, groups) -> list[tuple[str, nn.BatchNorm2d]]:
    """The BatchNorms outside every group (never pruned), in module order."""
    grouped = {id(bn) for _, g in groups for bn, _, _ in _bn_items(dg, g)}
    return [(name, bn) for name, bn in batchnorms(model) if id(bn) not in grouped]


class GraphFamily(Family):
    """A family whose models are pruned through their dependency graph; a subclass says how
    the unpruned model of an arch is made (:meth:`unpruned`)."""

    def unpruned(self, arch: str, num_classes: int) -> nn.Module:
        raise NotImplementedError

    def build(self, arch, num_classes, widths=None):
        return self.build_at(arch, num_classes, widths, None)

    def build_at(self, arch, num_classes, widths, input_size):
        """The model of :meth:`build`, its graph traced at ``input_size`` px (None:
        TRACE_SIZE): the size the run feeds it."""
        model = self.unpruned(arch, check_num_classes(num_classes))
        model.arch, model.num_classes, model.widths = arch, num_classes, check_history(widths)
        model.trace_size = input_size or TRACE_SIZE
        if model.widths:
            dg = graph(model)
            with torch.enable_grad():  # the replayed groups re-trace: not under no_grad
                dg.load_pruning_history(copy.deepcopy(model.widths))
        return model

    def check_prunable(self, model):
        self.units(model)  # traces the graph and finds its groups, as pruning will

    def default_widths(self, arch):
        return []

    def widths_from_state(self, arch, state):
        return []  # a file without its history: taken as unpruned (the shapes then check it)

    def check_widths(self, arch, widths):
        return check_history(widths)

    def units(self, model, bn_score=None):
        dg, score = graph(model), bn_scorer(bn_score)
        groups = _groups(model, dg)
        units = [Unit(name, _importance(dg, g, len(g[0].idxs), score), True)
                 for name, g in groups]
        return units + [Unit(name, score(bn), False) for name, bn in _ungrouped(model, dg, groups)]

    def frozen(self, model, ignore):
        """The groups that change the shape of a layer in ``ignore`` (names): left whole."""
        if not ignore:
            return set()
        layers = {model.get_submodule(name) for name in ignore}
        return {name for name, group in _groups(model, graph(model))
                if any(item.dep.target.module in layers for item in group)}

    def filter_norms(self, model, p):
        """A group's: its root layer's output filters, by Torch-Pruning's magnitude importance
        (``first`` group reduction, no normaliser: trainer.prune.criteria normalises). A
        BatchNorm outside every group (never pruned) has no root layer: its |γ| stands in."""
        dg = graph(model)
        imp = tp.importance.GroupMagnitudeImportance(p=p, group_reduction="first",
                                                     normalizer=None,
                                                     target_types=[nn.Conv2d, nn.Linear])
        groups = _groups(model, dg)
        norms = [imp(g).float().cpu().pow(1.0 / p) for _, g in groups]
        return norms + [abs_gamma(bn) for _, bn in _ungrouped(model, dg, groups)]

    def apply(self, model, masks):
        new = copy.deepcopy(model).cpu()
        dg = graph(new)
        for unit, mask in zip(self.units(model), masks):
            removed = torch.nonzero(~mask.cpu()).flatten().tolist()
            if not unit.prunable or not removed:
                continue
            root = new.get_submodule(unit.name)
            pruner = dg.get_pruner_of_module(root)
            dg.get_pruning_group(root, pruner.prune_out_channels, removed).prune()
        new.widths = model.widths + [[n, bool(o), [int(i) for i in idx]]
                                     for n, o, idx in dg.pruning_history()]
        return new

    def shape(self, model, masks):
        return self.apply(model, masks)  # the graph's pruning needs real tensors

    def skeleton(self, arch, num_classes, widths):
        return self.build(arch, num_classes, widths)  # replaying a history needs real tensors

    def skeleton_of(self, model):
        return copy.deepcopy(model).cpu()

    def stage(self, arch, unit):
        return unit.rsplit(".", 1)[0] if "." in unit else unit

"""What every architecture family provides for slimming, and the helpers they share.

A *family* (a module of ``trainer.models`` exporting ``FAMILY``: resnet, vgg, preresnet,
densenet, and the dependency-graph families of ``trainer.models.graph``) builds its models from
a list of channel ``widths`` (the lab files' ``cfg``), lists the model's BatchNorm *units* with
a score per channel (|γ|, or another per-BatchNorm score; one unit per BatchNorm, or per coupled
channel group), gives the norms of the filters that make each unit's channels, and applies
keep-masks: a new, smaller model with the kept channels' weights. ``trainer.prune.engine`` runs
the one pruning rule over any family (the criteria: ``trainer.prune.criteria``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn


class Unit(NamedTuple):
    """Channels kept or removed together: a BatchNorm (``name``), or a coupled group named by
    its root layer. ``score``: one value per live channel, the larger the more worth keeping:
    a family gives the |γ| (a group: its BNs' mean |γ|); a criterion of
    ``trainer.prune.criteria`` replaces it."""

    name: str
    score: torch.Tensor
    prunable: bool


class Family:
    """The interface of an architecture family (see the module docstring)."""

    def build(self, arch: str, num_classes: int, widths: Any = None) -> nn.Module:
        raise NotImplementedError

    def build_at(self, arch: str, num_classes: int, widths: Any,
                 input_size: int | None) -> nn.Module:
        """:meth:`build` for inputs of ``input_size`` px a side (None: unknown). A family that
        knows its layers by name builds the same model at any size; a dependency-graph family
        traces the model at it."""
        return self.build(arch, num_classes, widths)

    def check_prunable(self, model: nn.Module) -> None:
        """ConfigError, before a run trains ``model``, if this family cannot prune it (a graph
        that cannot be traced); the families that know their layers by name always can."""

    def default_widths(self, arch: str) -> Any:
        raise NotImplementedError

    def check_widths(self, arch: str, widths: Any) -> Any:
        """``widths`` normalised, or ValueError naming the bad entry."""
        raise NotImplementedError

    def widths_from_state(self, arch: str, state: dict[str, torch.Tensor]) -> Any:
        """The widths a bare state_dict of ``arch`` was built with (KeyError if not one)."""
        raise NotImplementedError

    def units(self, model: nn.Module, bn_score: BNScore = None) -> list[Unit]:
        """Every unit, scored by ``bn_score(bn)`` (one value per channel of the BatchNorm;
        None: |γ|) on its live channels."""
        raise NotImplementedError

    def frozen(self, model: nn.Module, ignore: set[str]) -> set[str]:
        """The units that pruning must leave whole so that the layers named in ``ignore`` keep
        their shape (here: the units named there)."""
        return {u for u in ignore if u in dict(batchnorms(model))}

    def filter_norms(self, model: nn.Module, p: int) -> list[torch.Tensor]:
        """Per unit (in :meth:`units` order), the p-norm of the filter that makes each live
        channel: the output filter of the conv feeding its BatchNorm (Li et al. 2017), or, for a
        channel selection (its BatchNorm is kept whole), the input kernels of the layer that
        reads the channel, the weights its removal deletes."""
        raise NotImplementedError

    def new_widths(self, model: nn.Module, masks: Sequence[torch.Tensor]) -> Any:
        """The widths of the model the masks leave (default: the kept count of each unit)."""
        return [int(m.sum()) for m in masks]

    def apply(self, model: nn.Module, masks: Sequence[torch.Tensor]) -> nn.Module:
        """A new model keeping, per unit, the live channels whose mask is True."""
        raise NotImplementedError

    def rebuild(self, model: nn.Module, masks: Sequence[torch.Tensor]) -> nn.Module:
        """A fresh model of the widths the masks leave (its weights: see :meth:`apply`)."""
        return self.build(model.arch, model.num_classes, self.new_widths(model, masks))

    def shape(self, model: nn.Module, masks: Sequence[torch.Tensor]) -> nn.Module:
        """The model the masks leave, without weights (on the meta device): for counting."""
        with torch.device("meta"):
            return self.rebuild(model, masks)

    def skeleton(self, arch: str, num_classes: int, widths: Any) -> nn.Module:
        """The model of these widths, its weights left out where the family can (on the meta
        device): for its shapes and counts."""
        with torch.device("meta"):
            return self.build(arch, num_classes, widths)

    def skeleton_of(self, model: nn.Module) -> nn.Module:
        """:meth:`skeleton` of a built model, passing on what its channel selections pass (a
        pruned ResNet-164 or DenseNet-40 keeps its BatchNorms whole: the widths alone build
        selections that pass every channel, and the next conv then gets too many)."""
        shape = self.skeleton(model.arch, model.num_classes, model.widths)
        built = dict(model.named_modules())
        for name, select in shape.named_modules():
            if isinstance(select, ChannelSelection) and name in built:
                select.keep = built[name].keep.to(select.indexes.device)
                select.passes_all = built[name].passes_all
        return shape

    def stage(self, arch: str, unit: str) -> str:
        """The stage a unit belongs to, for per-stage summaries (e.g. 'layer2')."""
        return unit.split(".")[0]

    def init_gamma(self, model: nn.Module, gamma: float) -> None:
        """A fresh model's BatchNorm γ."""
        for _, bn in batchnorms(model):
            nn.init.constant_(bn.weight, gamma)

    def detect(self, state: dict[str, torch.Tensor]) -> str | None:
        """The arch a bare file's keys and shapes say it is (None: not this family's)."""
        return None

    def widths_entry(self, arch: str, widths: Any, key: str) -> str:
        """Which widths entry sets the shape of state_dict entry ``key`` (for messages)."""
        return "cfg"


# ---------------------------------------------------------------- shared helpers


def batchnorms(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """(name, module) of every BatchNorm2d in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def abs_gamma(bn: nn.BatchNorm2d) -> torch.Tensor:
    return bn.weight.detach().abs().float().cpu()


# A per-channel score of a BatchNorm (None: |γ|, the network-slimming criterion).
BNScore = Callable[[nn.BatchNorm2d], torch.Tensor] | None


def bn_scorer(bn_score: BNScore) -> Callable[[nn.BatchNorm2d], torch.Tensor]:
    return abs_gamma if bn_score is None else bn_score


def filter_norms_of(model: nn.Module, layers: Sequence[tuple[str, int]],
                    p: int) -> list[torch.Tensor]:
    """Per (layer name, dim): the p-norm of each slice of the layer's weight along ``dim`` (0:
    its output filters, 1: its input kernels), one per channel."""
    out = []
    for name, dim in layers:
        weight = model.get_submodule(name).weight.detach().float().cpu()
        rows = weight.transpose(0, dim).flatten(1)
        out.append(rows.abs().pow(p).sum(1).pow(1.0 / p))
    return out


def check_num_classes(num_classes: Any) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes is {num_classes!r}; expected a positive integer")
    return num_classes


def check_int_widths(widths: Sequence[Any] | None, names: Sequence[str], full: Sequence[int],
                     prunable: set[int] | None, layout: str) -> list[int]:
    """One int per BatchNorm (``full`` when None), in 1..full at the ``prunable`` positions
    (None: all), or ValueError naming the entry; ``layout`` says what the entries are (the
    messages say ``cfg``: the name the official files give the list)."""
    if widths is None:
        return list(full)
    if isinstance(widths, torch.Tensor):
        widths = widths.tolist()
    widths = list(widths)
    if len(widths) != len(full):
        raise ValueError(f"cfg has {len(widths)} entries; expected {len(full)} {layout}")
    prunable = set(range(len(full))) if prunable is None else prunable
    out = []
    for i, value in enumerate(widths):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(  # noqa: TRY004 -- a bad value of a cfg, as the API promises
                f"cfg[{i}] ({names[i]}) is {value!r}; expected an integer channel count")
        if i in prunable and not 1 <= value <= full[i]:
            raise ValueError(f"cfg[{i}] ({names[i]}) is {value}; expected 1..{full[i]} channels")
        out.append(value)
    return out


class Slicing(NamedTuple):
    """How a pruned model's tensors come from the original's: per module, the unit whose mask
    selects its output channels (dim 0) and input channels (dim 1); per channel-selection
    module, the unit whose kept channels it selects."""

    channels: dict[str, tuple[int | None, int | None]]
    selects: dict[str, int]

    @classmethod
    def of(cls, outs: dict[str, int], ins: dict[str, int],
           selects: dict[str, int] | None = None) -> Slicing:
        """From module -> unit maps of output channels and of input channels."""
        return cls({m: (outs.get(m), ins.get(m)) for m in outs.keys() | ins.keys()},
                   selects or {})


def transfer(old: nn.Module, new: nn.Module, masks: Sequence[torch.Tensor],
             slicing: Slicing) -> nn.Module:
    """Load ``new`` with ``old``'s tensors, sliced by the unit masks as ``slicing`` says.

    A mask covers a unit's live channels; a selection module's indexes mark the live channels
    of its full-width BatchNorm, so its kept ones are the live ones the mask keeps.
    """
    state = {k: v.detach().cpu() for k, v in old.state_dict().items()}
    out = {}
    for key in new.state_dict():
        module, _, leaf = key.rpartition(".")
        value = state[key]
        if module in slicing.selects:
            live = torch.nonzero(value > 0).flatten()
            value = torch.zeros_like(value)
            value[live[masks[slicing.selects[module]].cpu()]] = 1.0
        elif value.dim() >= 1:
            out_unit, in_unit = slicing.channels.get(module, (None, None))
            if out_unit is not None:
                value = value[masks[out_unit].cpu()]
            if in_unit is not None and value.dim() >= 2:
                value = value[:, masks[in_unit].cpu()]
        out[key] = value.clone()
    new.load_state_dict(out)
    return new


def selected_units(model: nn.Module, names: Sequence[str],
                   select_of: Callable[[str], str | None], bn_score: BNScore = None) -> list[Unit]:
    """A prunable unit per BatchNorm in ``names``: the score (|γ|) of the channels that the
    channel selection named ``select_of(name)`` passes on (every channel where it names none)."""
    out, score = [], bn_scorer(bn_score)
    for name in names:
        bn, select = model.get_submodule(name), select_of(name)
        live = live_channels(model.get_submodule(select) if select else None, bn)
        out.append(Unit(name, score(bn)[live], True))
    return out


def live_channels(select: nn.Module | None, bn: nn.BatchNorm2d) -> torch.Tensor:
    """Indices of ``bn``'s channels a following channel-selection module passes on."""
    if select is None:
        return torch.arange(bn.num_features)
    return torch.nonzero(select.indexes.detach().cpu() > 0).flatten()


class ChannelSelection(nn.Module):
    """Passes on the channels whose ``indexes`` entry is non-zero (the network-slimming code's
    ``channel_selection``, under the same name): a pre-activation network prunes the input of
    a block's first conv without pruning the BatchNorm the shortcut shares.

    ``indexes`` is a buffer here (a Parameter there, never trained): the key is the same, so
    the official files load, and it is not counted as a weight. The kept indices are computed
    when ``indexes`` is loaded, not in every forward (a device sync per block on a GPU)."""

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        self.register_buffer("indexes", torch.ones(num_channels))
        self.register_buffer("keep", torch.arange(num_channels), persistent=False)
        self.passes_all = True

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        keep = torch.nonzero(self.indexes > 0).flatten()
        self.keep = keep.to(self.indexes.device)
        self.passes_all = keep.numel() == self.indexes.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.passes_all else x.index_select(1, self.keep)


def add_selected_head(model: nn.Module, channels: int, kept: int, num_classes: int) -> None:
    """The end of the paper's pre-activation nets (ResNet-164, DenseNet-40): a last BatchNorm
    of ``channels`` whose ``kept`` live ones a selection hands, pooled, to the classifier.
    Attributes on ``model`` itself: the official files name them bn, select and fc."""
    model.bn = nn.BatchNorm2d(channels)
    model.select = ChannelSelection(channels)
    model.relu = nn.ReLU(inplace=True)
    model.avgpool = nn.AdaptiveAvgPool2d(1)  # the official AvgPool2d(8) at 32x32 input
    model.fc = nn.Linear(kept, num_classes)


def selected_head(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The forward of :func:`add_selected_head`'s layers."""
    x = model.relu(model.select(model.bn(x)))
    return model.fc(torch.flatten(model.avgpool(x), 1))


class WidthListFamily(Family):
    """A family of nets built as ``net(num_classes, widths, arch)`` from a flat list of widths,
    with its module's ``default_widths(arch)`` and ``validate_widths(widths, arch)``."""

    def __init__(self, net: Callable[..., nn.Module], defaults: Callable[[str], list[int]],
                 validate: Callable[[Any, str], list[int]]) -> None:
        self.net, self.defaults, self.validate = net, defaults, validate

    def build(self, arch, num_classes, widths=None):
        return self.net(num_classes, widths, arch)

    def default_widths(self, arch):
        return self.defaults(arch)

    def check_widths(self, arch, widths):
        return self.validate(widths, arch)


def he_init(model: nn.Module) -> None:
    """The network-slimming code's initialisation: conv N(0, √(2/(k·k·out))), linear
    N(0, 0.01) with zero bias, BatchNorm bias 0 (γ: ``Family.init_gamma``)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, (2.0 / n) ** 0.5)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.zeros_(m.bias)

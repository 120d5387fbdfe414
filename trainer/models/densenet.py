"""The network-slimming paper's DenseNet-40 (depth 3n+4, growth rate 12, basic blocks, two
transitions), with the official code's module names and ``cfg``.

Every layer runs bn1 -> select -> ReLU -> conv1 on the concatenation of all earlier outputs;
a BatchNorm's input is shared by every later layer, so no BatchNorm is cut: each one's
channel-selection layer passes on the kept channels to the conv that follows. ``cfg`` holds
the kept channels of every BatchNorm in module order (39 ints for depth 40).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config.archs import ARCHS
from trainer.models.family import (
    ChannelSelection,
    Slicing,
    WidthListFamily,
    add_selected_head,
    check_int_widths,
    check_num_classes,
    filter_norms_of,
    he_init,
    selected_head,
    selected_units,
    transfer,
)


def _spec(arch: str) -> tuple[int, int]:
    p = ARCHS[arch].params
    return (p["depth"] - 4) // 3, p["growth"]


def bn_names(arch: str = "densenet40") -> list[str]:
    n, _ = _spec(arch)
    names = []
    for d in (1, 2, 3):
        names += [f"dense{d}.{i}.bn1" for i in range(n)]
        if d < 3:
            names.append(f"trans{d}.bn1")
    return names + ["bn"]


def default_widths(arch: str = "densenet40") -> list[int]:
    """Input channels of every BatchNorm: 2·growth at the start, + growth per layer."""
    n, growth = _spec(arch)
    widths, start = [], 2 * growth
    for _ in range(3):
        widths += [start + growth * i for i in range(n + 1)]
        start += growth * n
    return widths


def validate_widths(widths: Sequence[int] | None, arch: str = "densenet40") -> list[int]:
    """``widths`` as a list of ints, or ValueError naming the bad entry."""
    return check_int_widths(widths, bn_names(arch), default_widths(arch), None,
                            f"for {arch} (one per BatchNorm: each layer, each transition, "
                            "the final BN)")


class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, run: int, growth: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.select = ChannelSelection(inplanes)
        self.conv1 = nn.Conv2d(run, growth, kernel_size=3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((x, self.conv1(self.relu(self.select(self.bn1(x))))), 1)


class Transition(nn.Module):
    def __init__(self, inplanes: int, outplanes: int, run: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.select = ChannelSelection(inplanes)
        self.conv1 = nn.Conv2d(run, outplanes, kernel_size=1, bias=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv1(self.relu(self.select(self.bn1(x)))), 2)


class DenseNet(nn.Module):
    def __init__(self, num_classes: int = 10, widths: Sequence[int] | None = None,
                 arch: str = "densenet40"):
        super().__init__()
        self.arch, self.num_classes = arch, check_num_classes(num_classes)
        self.widths = validate_widths(widths, arch)
        n, growth = _spec(arch)
        inplanes = 2 * growth
        self.conv1 = nn.Conv2d(3, inplanes, kernel_size=3, padding=1, bias=False)
        pos = 0
        for d in (1, 2, 3):
            layers = []
            for i in range(n):
                layers.append(BasicBlock(inplanes, self.widths[pos + i], growth))
                inplanes += growth
            setattr(self, f"dense{d}", nn.Sequential(*layers))
            pos += n
            if d < 3:  # compression 1: a transition keeps the width, halves the size
                setattr(self, f"trans{d}", Transition(inplanes, inplanes, self.widths[pos]))
                pos += 1
        add_selected_head(self, inplanes, self.widths[-1], num_classes)
        he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.trans1(self.dense1(self.conv1(x)))
        return selected_head(self, self.dense3(self.trans2(self.dense2(x))))


def _prefix(bn_name: str) -> str:
    return bn_name[:-len("bn1")] if bn_name.endswith("bn1") else ""


class DenseNetFamily(WidthListFamily):
    def widths_from_state(self, arch, state):
        return [int((state[f"{_prefix(n)}select.indexes"] > 0).sum()) for n in bn_names(arch)]

    def units(self, model, bn_score=None):
        return selected_units(model, bn_names(model.arch), lambda n: f"{_prefix(n)}select",
                              bn_score)

    def filter_norms(self, model, p):
        """Every BatchNorm is kept whole and selected: the input kernels of the conv1 (the
        final BN: the fc) that reads it."""
        return filter_norms_of(model, [(f"{_prefix(n)}conv1" if n != "bn" else "fc", 1)
                                       for n in bn_names(model.arch)], p)

    def apply(self, model, masks):
        names = bn_names(model.arch)
        new = self.rebuild(model, masks)
        ins = {f"{_prefix(n)}conv1" if n != "bn" else "fc": i for i, n in enumerate(names)}
        selects = {f"{_prefix(n)}select": i for i, n in enumerate(names)}
        return transfer(model, new, masks, Slicing.of({}, ins, selects))

    def stage(self, arch, unit):
        return unit.split(".")[0] if unit != "bn" else "final bn"

    def detect(self, state):
        if "dense1.0.bn1.weight" not in state:
            return None
        n = len({k.split(".")[1] for k in state if k.startswith("dense1.")})
        return next((a for a, spec in ARCHS.items() if spec.family == "densenet"
                     and _spec(a)[0] == n), None)


FAMILY = DenseNetFamily(DenseNet, default_widths, validate_widths)

"""The network-slimming paper's CIFAR VGG with BatchNorm (VGG-11/13/16/19).

``feature`` holds, per ``widths`` entry, a 3x3 conv without bias -> BatchNorm -> ReLU, and a
MaxPool(2, 2) per ``'M'``; then AvgPool2d(2) and ``classifier`` = Linear(widths[-1], classes).
Module names and the ``cfg`` list (ints and 'M') are the official code's, so the files its
``vggprune.py`` and ``main.py`` write load as they are. Every BatchNorm is pruned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config.archs import ARCHS
from trainer.models.family import (
    Family,
    Slicing,
    Unit,
    batchnorms,
    bn_scorer,
    check_num_classes,
    filter_norms_of,
    he_init,
    transfer,
)

M = "M"
LAYOUTS: dict[int, list[Any]] = {
    11: [64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512],
    13: [64, 64, M, 128, 128, M, 256, 256, M, 512, 512, M, 512, 512],
    16: [64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M, 512, 512, 512],
    19: [64, 64, M, 128, 128, M, 256, 256, 256, 256, M, 512, 512, 512, 512, M,
         512, 512, 512, 512],
}


def _depth(arch: str) -> int:
    return ARCHS[arch].params["depth"]


def validate_widths(widths: Sequence[Any] | None, arch: str) -> list[Any]:
    """The official ``cfg`` of ``arch``: its ints (1..full) where the layout has convs and 'M'
    where it has max-pools; ValueError naming the first entry that is not."""
    full = LAYOUTS[_depth(arch)]
    if widths is None:
        return list(full)
    widths = list(widths)
    if len(widths) != len(full):
        raise ValueError(f"cfg has {len(widths)} entries; expected {len(full)} for {arch} "
                         f"(one per conv, 'M' per max-pool: {full})")
    for i, (value, ref) in enumerate(zip(widths, full)):
        if ref == M and value != M:
            raise ValueError(f"cfg[{i}] is {value!r}; expected 'M' (a max-pool) there")
        if ref != M and (isinstance(value, bool) or not isinstance(value, int)
                         or not 1 <= value <= ref):
            raise ValueError(f"cfg[{i}] (conv {_conv_number(full, i)}) is {value!r}; expected "
                             f"1..{ref} channels")
    return widths


def _conv_number(layout: list[Any], i: int) -> int:
    return sum(1 for v in layout[:i + 1] if v != M)


class VGG(nn.Module):
    def __init__(self, num_classes: int = 10, widths: Sequence[Any] | None = None,
                 arch: str = "vgg19"):
        super().__init__()
        self.arch, self.num_classes = arch, check_num_classes(num_classes)
        self.widths = validate_widths(widths, arch)
        layers: list[nn.Module] = []
        in_channels = 3
        for v in self.widths:
            if v == M:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1, bias=False),
                       nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            in_channels = v
        self.feature = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_channels, num_classes)
        he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(self.feature(x), 2)
        return self.classifier(torch.flatten(x, 1))


class VGGFamily(Family):
    def build(self, arch, num_classes, widths=None):
        return VGG(num_classes, widths, arch)

    def default_widths(self, arch):
        return list(LAYOUTS[_depth(arch)])

    def check_widths(self, arch, widths):
        return validate_widths(widths, arch)

    def widths_from_state(self, arch, state):
        convs = iter(int(state[f"feature.{j}.weight"].shape[0]) for j in self._conv_indices(arch))
        return [M if v == M else next(convs) for v in LAYOUTS[_depth(arch)]]

    def _conv_indices(self, arch):
        """Positions of the convs in ``feature`` (conv, bn, relu per entry; one per 'M')."""
        out, j = [], 0
        for v in LAYOUTS[_depth(arch)]:
            if v != M:
                out.append(j)
            j += 1 if v == M else 3
        return out

    def units(self, model, bn_score=None):
        score = bn_scorer(bn_score)
        return [Unit(name, score(bn), True) for name, bn in batchnorms(model)]

    def filter_norms(self, model, p):
        """feature.{j+1} (a BatchNorm) is fed by the conv feature.{j}."""
        return filter_norms_of(model, [(f"feature.{int(name.split('.')[1]) - 1}", 0)
                                       for name, _ in batchnorms(model)], p)

    def new_widths(self, model, masks):
        counts = iter(int(m.sum()) for m in masks)
        return [M if v == M else next(counts) for v in model.widths]

    def apply(self, model, masks):
        new = self.rebuild(model, masks)
        outs, ins = {}, {}
        for k, j in enumerate(self._conv_indices(model.arch)):
            outs[f"feature.{j}"] = outs[f"feature.{j + 1}"] = k  # the conv and its BN
            if k:
                ins[f"feature.{j}"] = k - 1
        ins["classifier"] = len(masks) - 1
        return transfer(model, new, masks, Slicing.of(outs, ins))

    def stage(self, arch, unit):
        """block1..block5: the convs between two max-pools."""
        j, pos, pools = int(unit.split(".")[1]), 0, 0
        for v in LAYOUTS[_depth(arch)]:
            if pos > j:
                break
            pools += v == M
            pos += 1 if v == M else 3
        return f"block{pools + 1}"

    def detect(self, state):
        if "classifier.weight" not in state or "feature.0.weight" not in state:
            return None
        convs = sum(1 for k, v in state.items() if k.startswith("feature.") and v.dim() == 4)
        return {8: "vgg11", 10: "vgg13", 13: "vgg16", 16: "vgg19"}.get(convs)

    def widths_entry(self, arch, widths, key):
        module = key.rsplit(".", 1)[0]
        for k, j in enumerate(self._conv_indices(arch)):
            if module in (f"feature.{j}", f"feature.{j + 1}"):
                i = [n for n, v in enumerate(widths) if v != M][k]
                return f"cfg[{i}]={widths[i]}"
        return "cfg"


FAMILY = VGGFamily()

"""The network-slimming paper's pre-activation ResNet-164 (bottleneck blocks, depth 9n+2,
widths 16/32/64, expansion 4), with the official code's module names and ``cfg``.

Each block runs bn1 -> select -> ReLU -> conv1 (1x1) -> bn2 -> ReLU -> conv2 (3x3, the stride)
-> bn3 -> ReLU -> conv3 (1x1), plus the shortcut (a 1x1 conv where the shape changes). bn1
normalises the block's input, which the shortcut also carries, so it is not cut: its
channel-selection layer passes on the kept channels to conv1. The final BN before the
classifier is selected the same way. ``cfg`` holds, per block, the kept channels of bn1, bn2
and bn3, then those of the final BN (163 ints for depth 164).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
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

STAGE_WIDTHS = (16, 32, 64)
EXPANSION = 4


def _blocks(arch: str) -> int:
    return (ARCHS[arch].params["depth"] - 2) // 9


def bn_names(arch: str = "resnet164") -> list[str]:
    names = [f"layer{s}.{b}.bn{k}" for s in (1, 2, 3) for b in range(_blocks(arch))
             for k in (1, 2, 3)]
    return names + ["bn"]


def default_widths(arch: str = "resnet164") -> list[int]:
    n, widths, inplanes = _blocks(arch), [], 16
    for planes in STAGE_WIDTHS:
        for _ in range(n):
            widths += [inplanes, planes, planes]
            inplanes = planes * EXPANSION
    return widths + [inplanes]


def validate_widths(widths: Sequence[int] | None, arch: str = "resnet164") -> list[int]:
    """``widths`` as a list of ints, or ValueError naming the bad entry."""
    return check_int_widths(widths, bn_names(arch), default_widths(arch), None,
                            f"for {arch} (bn1, bn2, bn3 per block, then the final BN)")


class Bottleneck(nn.Module):
    expansion = EXPANSION

    def __init__(self, inplanes: int, planes: int, run: Sequence[int], stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.select = ChannelSelection(inplanes)
        self.conv1 = nn.Conv2d(run[0], run[1], kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(run[1])
        self.conv2 = nn.Conv2d(run[1], run[2], kernel_size=3, stride=stride, padding=1,
                               bias=False)
        self.bn3 = nn.BatchNorm2d(run[2])
        self.conv3 = nn.Conv2d(run[2], planes * EXPANSION, kernel_size=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.select(self.bn1(x))))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + (x if self.downsample is None else self.downsample(x))


class PreResNet(nn.Module):
    def __init__(self, num_classes: int = 10, widths: Sequence[int] | None = None,
                 arch: str = "resnet164"):
        super().__init__()
        self.arch, self.num_classes = arch, check_num_classes(num_classes)
        self.widths = validate_widths(widths, arch)
        n = _blocks(arch)
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False)
        inplanes = 16
        for stage, planes in enumerate(STAGE_WIDTHS, start=1):
            run = self.widths[3 * n * (stage - 1):3 * n * stage]
            stride = 1 if stage == 1 else 2
            layers = []
            for b in range(n):
                downsample = None
                if b == 0 and (stride != 1 or inplanes != planes * EXPANSION):
                    downsample = nn.Sequential(nn.Conv2d(inplanes, planes * EXPANSION, 1,
                                                         stride=stride, bias=False))
                layers.append(Bottleneck(inplanes, planes, run[3 * b:3 * b + 3],
                                         stride if b == 0 else 1, downsample))
                inplanes = planes * EXPANSION
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
        add_selected_head(self, inplanes, self.widths[-1], num_classes)
        he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return selected_head(self, self.layer3(self.layer2(self.layer1(self.conv1(x)))))


def _select_name(bn_name: str) -> str | None:
    """The channel selection after a block's bn1 or the final BN (None after bn2, bn3)."""
    if bn_name == "bn":
        return "select"
    return bn_name[:-len("bn1")] + "select" if bn_name.endswith(".bn1") else None


class PreResNetFamily(WidthListFamily):
    def widths_from_state(self, arch, state):
        """bn1 and the final BN: the channels their selection passes on; bn2, bn3: width."""
        return [int((state[f"{_select_name(n)}.indexes"] > 0).sum()) if _select_name(n)
                else int(state[f"{n}.weight"].shape[0]) for n in bn_names(arch)]

    def units(self, model, bn_score=None):
        return selected_units(model, bn_names(model.arch), _select_name, bn_score)

    def filter_norms(self, model, p):
        """bn2 and bn3 are fed by conv1 and conv2; a block's bn1 and the final BN are kept
        whole and selected: the input kernels of the conv1 (the fc) that reads them."""
        layers = []
        for name in bn_names(model.arch):
            if name == "bn":
                layers.append(("fc", 1))
                continue
            block, bn = name.rsplit(".", 1)
            k = int(bn[2:])
            layers.append((f"{block}.conv1", 1) if k == 1 else (f"{block}.conv{k - 1}", 0))
        return filter_norms_of(model, layers, p)

    def apply(self, model, masks):
        names = bn_names(model.arch)
        new = self.rebuild(model, masks)
        outs, ins, selects = {}, {}, {"select": len(names) - 1}
        ins["fc"] = len(names) - 1
        for i, name in enumerate(names[:-1]):
            block, bn = name.rsplit(".", 1)
            k = int(bn[2:])
            ins[f"{block}.conv{k}"] = i
            if k == 1:
                selects[f"{block}.select"] = i
            else:
                outs[name] = outs[f"{block}.conv{k - 1}"] = i
        return transfer(model, new, masks, Slicing.of(outs, ins, selects))

    def detect(self, state):
        if "layer1.0.select.indexes" not in state or "dense1.0.bn1.weight" in state:
            return None
        blocks = len({k.split(".")[1] for k in state if k.startswith("layer1.")})
        return next((a for a, spec in ARCHS.items() if spec.family == "preresnet"
                     and _blocks(a) == blocks), None)


FAMILY = PreResNetFamily(PreResNet, default_widths, validate_widths)

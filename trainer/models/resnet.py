"""The lab's CIFAR ResNet family: ResNet-50 (the course lab's network, unchanged) and its
siblings ResNet-18/34 (BasicBlock) and ResNet-101 (Bottleneck).

Layout (must match the lab so existing ``model_prune.pth`` files load):

* stem: 3x3 conv (stride 1, no bias) -> BN -> ReLU -> MaxPool(3, 2, 1);
* four stages of widths 64/128/256/512, stride 2 on the first block of stages 2-4 (on the
  3x3 conv of a Bottleneck, expansion 4; on the first conv of a BasicBlock, expansion 1);
* a block whose input differs in width or size from its output has
  ``downsample = Sequential(Conv2d 1x1)`` with **no** BatchNorm;
* AdaptiveAvgPool2d(1) -> Linear(512 x expansion, num_classes).

``widths`` (the lab files' ``cfg``) has one entry per BatchNorm2d in module order: the stem,
then per block (bn1, bn2, bn3) for a Bottleneck or (bn1, bn2) for a BasicBlock. Only the
channels inside a block are pruned (Bottleneck: bn1, bn2; BasicBlock: bn1); the stem and each
block's output BN keep full width so shortcuts stay whole; the entries there are accepted but
ignored (lab files carry pruned counts at those positions).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from trainer.config.archs import ARCHS
from trainer.models.family import (
    Family,
    Slicing,
    Unit,
    batchnorms,
    bn_scorer,
    check_int_widths,
    check_num_classes,
    filter_norms_of,
    transfer,
)

STAGE_WIDTHS = (64, 128, 256, 512)
STEM_WIDTH = 64
EXPANSION = {"bottleneck": 4, "basic": 1}
PRUNED_BNS = {"bottleneck": ("bn1", "bn2"), "basic": ("bn1",)}
BNS_PER_BLOCK = {"bottleneck": 3, "basic": 2}


def _spec(arch: str) -> tuple[str, tuple[int, ...]]:
    params = ARCHS[arch].params
    return params["block"], params["blocks"]


def default_widths(arch: str = "resnet50") -> list[int]:
    """Full widths: the stem, then [w, w, 4w] per Bottleneck or [w, w] per BasicBlock."""
    block, blocks = _spec(arch)
    per_block = {"bottleneck": lambda w: [w, w, 4 * w], "basic": lambda w: [w, w]}[block]
    widths = [STEM_WIDTH]
    for width, n in zip(STAGE_WIDTHS, blocks):
        widths += per_block(width) * n
    return widths


def bn_names(arch: str = "resnet50") -> list[str]:
    """Module name of each BatchNorm2d, in widths order (``bn1``, ``layer1.0.bn1``, ...)."""
    block, blocks = _spec(arch)
    names = ["bn1"]
    for stage, n in enumerate(blocks, start=1):
        for b in range(n):
            names += [f"layer{stage}.{b}.bn{k}" for k in range(1, BNS_PER_BLOCK[block] + 1)]
    return names


def prunable_indices(arch: str = "resnet50") -> list[int]:
    """widths positions of the pruned BatchNorms."""
    pruned = tuple(f".{bn}" for bn in PRUNED_BNS[_spec(arch)[0]])
    return [i for i, name in enumerate(bn_names(arch)) if name.endswith(pruned)]


def validate_widths(widths: Sequence[int] | None, arch: str = "resnet50") -> list[int]:
    """``widths`` as a list of ints, or ValueError naming the bad entry."""
    block, blocks = _spec(arch)
    return check_int_widths(widths, bn_names(arch), default_widths(arch),
                            set(prunable_indices(arch)), f"(one per BatchNorm2d: stem + "
                            f"{BNS_PER_BLOCK[block]} x {sum(blocks)} blocks)")


def effective_widths(widths: Sequence[int] | None, arch: str = "resnet50") -> list[int]:
    """The widths actually built: prunable entries from ``widths``, full width elsewhere."""
    widths, full = validate_widths(widths, arch), default_widths(arch)
    prunable = set(prunable_indices(arch))
    return [c if i in prunable else full[i] for i, c in enumerate(widths)]


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, mid: Sequence[int], stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, mid[0], 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid[0])
        self.conv2 = nn.Conv2d(mid[0], mid[1], 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid[1])
        self.conv3 = nn.Conv2d(mid[1], out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, mid: Sequence[int], stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, mid[0], 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid[0])
        self.conv2 = nn.Conv2d(mid[0], planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + identity)


class ResNet(nn.Module):
    """A CIFAR ResNet of the lab's family; ``widths`` sets the width inside each block."""

    def __init__(self, num_classes: int = 10, widths: Sequence[int] | None = None,
                 arch: str = "resnet50"):
        super().__init__()
        self.arch, self.num_classes = arch, check_num_classes(num_classes)
        self.widths = validate_widths(widths, arch)
        block_type, blocks = _spec(arch)
        block, per = {"bottleneck": (Bottleneck, 3), "basic": (BasicBlock, 2)}[block_type]
        self.conv1 = nn.Conv2d(3, STEM_WIDTH, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_WIDTH)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes, pos = STEM_WIDTH, 1
        for stage, (width, n) in enumerate(zip(STAGE_WIDTHS, blocks), start=1):
            layers = []
            for b in range(n):
                stride = 2 if (b == 0 and stage > 1) else 1
                downsample = None
                if stride != 1 or inplanes != width * block.expansion:
                    downsample = nn.Sequential(
                        nn.Conv2d(inplanes, width * block.expansion, 1, stride=stride,
                                  bias=False))
                layers.append(block(inplanes, width, self.widths[pos:pos + per - 1], stride,
                                    downsample))
                inplanes, pos = width * block.expansion, pos + per
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ResNet50(ResNet):
    """The lab's CIFAR ResNet-50; ``widths`` (49 ints) sets the width of each bn1/bn2."""

    def __init__(self, num_classes: int = 10, widths: Sequence[int] | None = None):
        super().__init__(num_classes, widths, "resnet50")


def zero_init_last_bn(model: ResNet) -> ResNet:
    """Start every residual block as identity (its last BN's γ = 0; Goyal et al. 2017).

    From PyTorch's default init the lab's ResNet-50 diverges at lr 0.1 (gradient norm ~290 at
    step 0); with each block's last BN at zero the norm is ~0.3 and training is stable.
    """
    last = f".bn{BNS_PER_BLOCK[_spec(model.arch)[0]]}"
    for name, module in model.named_modules():
        if name.endswith(last):
            nn.init.zeros_(module.weight)
    return model


def _conv_of(bn_name: str) -> str:
    head, _, leaf = bn_name.rpartition(".")
    return (head + "." if head else "") + leaf.replace("bn", "conv")


class ResNetFamily(Family):
    def build(self, arch, num_classes, widths=None):
        return ResNet50(num_classes, widths) if arch == "resnet50" else ResNet(num_classes,
                                                                               widths, arch)

    def default_widths(self, arch):
        return default_widths(arch)

    def check_widths(self, arch, widths):
        return validate_widths(widths, arch)

    def widths_from_state(self, arch, state):
        return [int(state[f"{name}.weight"].shape[0]) for name in bn_names(arch)]

    def units(self, model, bn_score=None):
        prunable, score = set(prunable_indices(model.arch)), bn_scorer(bn_score)
        return [Unit(name, score(bn), i in prunable)
                for i, (name, bn) in enumerate(batchnorms(model))]

    def filter_norms(self, model, p):
        """Every BatchNorm is fed by the conv of its number: bn1 <- conv1, layer1.0.bn2 <-
        layer1.0.conv2."""
        return filter_norms_of(model, [(_conv_of(name), 0) for name, _ in batchnorms(model)], p)

    def apply(self, model, masks):
        """bn1/bn2 sliced by their masks; each conv by its BN's mask on output channels and by
        the previous mask on input channels; downsample convs, the stem, block outputs and fc
        whole."""
        new = self.rebuild(model, masks)
        names, outs, ins = bn_names(model.arch), {}, {}
        for i in prunable_indices(model.arch):
            block, bn = names[i].rsplit(".", 1)
            k = int(bn[2:])
            outs[names[i]] = outs[f"{block}.conv{k}"] = i
            ins[f"{block}.conv{k + 1}"] = i
        return transfer(model, new, masks, Slicing.of(outs, ins))

    def init_gamma(self, model, gamma):
        super().init_gamma(model, gamma)
        zero_init_last_bn(model)

    def detect(self, state):
        if "layer1.0.conv1.weight" not in state or "layer4.0.conv1.weight" not in state:
            return None
        for arch in ("resnet50", "resnet18", "resnet34", "resnet101"):
            if set(state) == set(self._keys(arch)):
                return arch
        return None

    def _keys(self, arch):
        with torch.device("meta"):
            return list(self.build(arch, 10).state_dict())

    def widths_entry(self, arch, widths, key):
        names, eff = bn_names(arch), effective_widths(widths, arch)
        layer = key.rsplit(".", 1)[0]
        for i, name in enumerate(names):
            if layer == name or layer == name.replace("bn", "conv"):
                return f"cfg[{i}]={eff[i]} for {name}"
        return "cfg"


FAMILY = ResNetFamily()

"""The course lab's prunable CIFAR ResNet-50.

Layout (must match the lab so existing ``model_prune.pth`` files load):

* stem: 3x3 conv (stride 1, no bias) -> BN -> ReLU -> MaxPool(3, 2, 1);
* Bottleneck stages of [3, 4, 6, 3] blocks, widths 64/128/256/512, expansion 4,
  stride 2 on the 3x3 conv of the first block of stages 2-4;
* the first block of each stage has ``downsample = Sequential(Conv2d 1x1)`` with
  **no** BatchNorm;
* AdaptiveAvgPool2d(1) -> Linear(2048, num_classes).

``widths`` (the lab files' ``cfg``) has one entry per BatchNorm2d in module order (49 = stem
+ 3 x 16 blocks). Only each block's bn1/bn2 are pruned; the stem and every bn3 keep full
width so identity shortcuts stay identity; the entries there are accepted but ignored.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

ARCH = "resnet50"
STAGE_BLOCKS = (3, 4, 6, 3)
STAGE_WIDTHS = (64, 128, 256, 512)
EXPANSION = 4
STEM_WIDTH = 64
NUM_BN = 1 + 3 * sum(STAGE_BLOCKS)  # 49


def default_widths() -> list[int]:
    """Full widths: [64] + [w, w, 4w] for every block."""
    widths = [STEM_WIDTH]
    for width, blocks in zip(STAGE_WIDTHS, STAGE_BLOCKS):
        widths += [width, width, width * EXPANSION] * blocks
    return widths


def bn_names() -> list[str]:
    """Module name of each BatchNorm2d, in widths order (``bn1``, ``layer1.0.bn1``, ...)."""
    names = ["bn1"]
    for stage, blocks in enumerate(STAGE_BLOCKS, start=1):
        for b in range(blocks):
            names += [f"layer{stage}.{b}.bn{k}" for k in (1, 2, 3)]
    return names


def prunable_indices() -> list[int]:
    """widths positions of the pruned BatchNorms (each block's bn1 and bn2)."""
    return [i for i, name in enumerate(bn_names()) if name.endswith((".bn1", ".bn2"))]


def validate_widths(widths: Sequence[int] | None) -> list[int]:
    """Return ``widths`` as a list of ints, or raise ValueError naming the bad entry (the
    messages say ``cfg``: the name the lab's files give the list)."""
    if widths is None:
        return default_widths()
    if isinstance(widths, torch.Tensor):
        widths = widths.tolist()
    widths = list(widths)
    if len(widths) != NUM_BN:
        raise ValueError(
            f"cfg has {len(widths)} entries; expected {NUM_BN} "
            "(one per BatchNorm2d: stem + 3 x 16 blocks)"
        )
    names, full = bn_names(), default_widths()
    prunable = set(prunable_indices())
    out = []
    for i, value in enumerate(widths):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(  # noqa: TRY004 -- a bad value of a cfg, as the API promises
                f"cfg[{i}] ({names[i]}) is {value!r}; expected an integer channel count"
            )
        if i in prunable and not 1 <= value <= full[i]:
            raise ValueError(
                f"cfg[{i}] ({names[i]}) is {value}; expected 1..{full[i]} channels"
            )
        out.append(value)
    return out


def effective_widths(widths: Sequence[int] | None) -> list[int]:
    """The widths actually built: prunable entries from ``widths``, full width elsewhere."""
    widths, full = validate_widths(widths), default_widths()
    prunable = set(prunable_indices())
    return [c if i in prunable else full[i] for i, c in enumerate(widths)]


class Bottleneck(nn.Module):
    expansion = EXPANSION

    def __init__(self, inplanes: int, planes: int, mid1: int, mid2: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, mid1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid1)
        self.conv2 = nn.Conv2d(mid1, mid2, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid2)
        self.conv3 = nn.Conv2d(mid2, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class ResNet50(nn.Module):
    """The lab's CIFAR ResNet-50; ``widths`` (49 ints) sets the width of each bn1/bn2."""

    def __init__(self, num_classes: int = 10, widths: Sequence[int] | None = None):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes is {num_classes!r}; expected a positive integer")
        self.widths = validate_widths(widths)
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(3, STEM_WIDTH, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_WIDTH)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes, pos = STEM_WIDTH, 1
        for stage, (width, blocks) in enumerate(zip(STAGE_WIDTHS, STAGE_BLOCKS), start=1):
            layers = []
            for b in range(blocks):
                stride = 2 if (b == 0 and stage > 1) else 1
                downsample = None
                if b == 0:
                    downsample = nn.Sequential(
                        nn.Conv2d(inplanes, width * EXPANSION, 1, stride=stride, bias=False)
                    )
                layers.append(Bottleneck(inplanes, width, self.widths[pos], self.widths[pos + 1],
                                         stride, downsample))
                inplanes, pos = width * EXPANSION, pos + 3
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def batchnorms(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """(name, module) of every BatchNorm2d in module (= widths) order."""
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


def zero_init_last_bn(model: ResNet50) -> ResNet50:
    """Start every residual block as identity (bn3 γ = 0; Goyal et al. 2017).

    From PyTorch's default init this ResNet-50 diverges at lr 0.1 (gradient norm ~290 at
    step 0); with each block's last BN at zero the norm is ~0.3 and training is stable.
    """
    for name, module in model.named_modules():
        if name.endswith(".bn3"):
            nn.init.zeros_(module.weight)
    return model


def fresh_model(num_classes: int, gamma: float = 1.0) -> ResNet50:
    """The model ``train`` starts from without --init (seed the RNG first): every BatchNorm γ
    at ``gamma`` (PyTorch's 1.0 by default; the network-slimming code uses 0.5), then each
    block's bn3 γ at 0."""
    model = ResNet50(num_classes)
    if gamma != 1.0:
        for _, bn in batchnorms(model):
            nn.init.constant_(bn.weight, gamma)
    return zero_init_last_bn(model)

"""Every architecture by name: build it, name its family, start it fresh, recognise a file.

``new_model(arch, num_classes, widths)`` is the one way slimtune makes a model: the arch is
looked up in ``trainer.archs`` and built by its family (trainer.resnet, trainer.vgg,
trainer.preresnet, trainer.densenet, trainer.tvmodels). Every model carries ``.arch``,
``.num_classes`` and ``.widths`` (what its checkpoint stores as ``cfg``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from trainer import densenet, preresnet, resnet, tvmodels, vgg
from trainer.archs import get_arch
from trainer.slim import Family, batchnorms, count_params, unwrap_model

FAMILIES: dict[str, Family] = {"resnet": resnet.FAMILY, "vgg": vgg.FAMILY,
                               "preresnet": preresnet.FAMILY, "densenet": densenet.FAMILY,
                               "torchvision": tvmodels.TorchvisionFamily()}

__all__ = ["FAMILIES", "batchnorms", "count_params", "detect_arch", "family",
           "fresh_model", "new_model", "unwrap_model"]


def family(arch: str) -> Family:
    """The family that builds and prunes ``arch`` (ConfigError for an unknown name)."""
    return FAMILIES[get_arch(arch).family]


def new_model(arch: str, num_classes: int, widths: Any = None) -> nn.Module:
    """``arch`` with ``num_classes`` outputs at ``widths`` (None: unpruned)."""
    return family(arch).build(arch, num_classes, widths)


def fresh_model(arch: str, num_classes: int, gamma: float) -> nn.Module:
    """The model ``train`` starts from without --init (seed the RNG first): every BatchNorm γ
    at ``gamma``, then what the family adds (the lab's ResNets: each block's last BN at 0)."""
    model = new_model(arch, num_classes)
    family(arch).init_gamma(model, gamma)
    return model


def detect_arch(state: dict) -> str | None:
    """The arch whose layout a bare state_dict has (official files name none), else None."""
    for fam in FAMILIES.values():
        arch = fam.detect(state)
        if arch is not None:
            return arch
    return None

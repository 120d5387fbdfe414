"""Any classification CNN of ``torchvision.models`` (``--arch torchvision:NAME``), slimmed through
its dependency graph (``trainer.models.graph``); no pretrained weights: built with
``num_classes``."""

from __future__ import annotations

import torchvision
from torch import nn

from trainer.config.archs import TORCHVISION
from trainer.errors import ConfigError
from trainer.models.family import batchnorms
from trainer.models.graph import GraphFamily


def model_name(arch: str) -> str:
    return arch[len(TORCHVISION):]


def classification_models() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


class TorchvisionFamily(GraphFamily):
    def unpruned(self, arch: str, num_classes: int) -> nn.Module:
        name = model_name(arch)
        if name not in classification_models():
            raise ConfigError(f"--arch {arch}: {name!r} is not a torchvision classification "
                              "model; use one of torchvision.models.list_models(module="
                              "torchvision.models), e.g. torchvision:resnet18, "
                              "torchvision:mobilenet_v2")
        model = torchvision.models.get_model(name, num_classes=num_classes, weights=None)
        if not batchnorms(model):
            raise ConfigError(f"--arch {arch} has no BatchNorm2d layers, and network slimming "
                              "prunes by BatchNorm γ; choose a CNN with BatchNorm, e.g. "
                              "torchvision:resnet18")
        return model


FAMILY = TorchvisionFamily()

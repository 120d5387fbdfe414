"""Any CNN of timm (``--arch timm:NAME``, the ``timm`` extra), slimmed through its dependency
graph (``trainer.models.graph``) like torchvision's: built by name with ``num_classes`` and
``pretrained=False`` (a run never downloads; ``train --init FILE`` loads published weights).

A timm model is refused in one line when network slimming cannot prune it: no BatchNorm2d
(ConvNeXt's LayerNorm, a ViT), or a graph Torch-Pruning cannot trace (``trainer.models.graph``
says so when it first traces the model).
"""

from __future__ import annotations

from torch import nn

from trainer.config.archs import TIMM
from trainer.errors import ConfigError
from trainer.models.family import batchnorms
from trainer.models.graph import GraphFamily

EXTRA = 'pip install "slimtune[timm]"'
# timm families network slimming cannot prune, by name prefix, with the reason (measured with
# timm 1.0 and Torch-Pruning 1.6; docs/models.md lists them).
REFUSED = {
    "rexnet": "its blocks add the shortcut into a slice of the channels (x[:, :C] += "
              "shortcut), and Torch-Pruning's dependency search on it does not finish (over "
              "2 minutes for rexnet_100)",
}


def model_name(arch: str) -> str:
    return arch[len(TIMM):]


def _timm():
    """The timm module, or one line naming the extra that installs it."""
    try:
        import timm
    except ImportError:
        raise ConfigError("--arch timm:NAME needs the timm package, which is not installed; "
                          f"install the extra: {EXTRA}") from None
    return timm


class TimmFamily(GraphFamily):
    def unpruned(self, arch: str, num_classes: int) -> nn.Module:
        timm, name = _timm(), model_name(arch)
        if not timm.is_model(name):
            raise ConfigError(f"--arch {arch}: {name!r} is not a timm model; use a name from "
                              "timm.list_models(), e.g. timm:resnet18, timm:efficientnet_b0")
        why = next((w for prefix, w in REFUSED.items() if name.startswith(prefix)), None)
        if why is not None:
            raise ConfigError(f"--arch {arch} cannot be slimmed: {why}; choose another timm "
                              "CNN, e.g. timm:resnet18")
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
        if not batchnorms(model):
            raise ConfigError(f"--arch {arch} has no BatchNorm2d layers (its norms: "
                              f"{_norm_kinds(model)}), and network slimming prunes by "
                              "BatchNorm γ; choose a timm CNN with BatchNorm, e.g. timm:resnet18")
        return model


def _norm_kinds(model: nn.Module) -> str:
    """The kinds of normalisation layer a model has ('LayerNorm2d, LayerNorm' or 'none')."""
    kinds = dict.fromkeys(type(m).__name__ for m in model.modules()
                          if type(m).__name__.endswith(("Norm", "Norm1d", "Norm2d")))
    return ", ".join(list(kinds)[:3]) or "none"


FAMILY = TimmFamily()

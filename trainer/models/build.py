"""Every architecture by name: its family, a new model, a fresh one, a file's arch.

``new_model(arch, num_classes, widths)`` is the one way slimtune makes a model: the arch is
looked up in the registry (``trainer.config.archs``) and built by its family, the module of
``trainer.models`` the registry names. Every model carries ``.arch``, ``.num_classes`` and
``.widths`` (what its checkpoint stores as ``cfg``).
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from trainer.config.archs import ARCHS, get_arch
from trainer.models.family import ChannelSelection, Family


def family(arch: str) -> Family:
    """The family that builds and prunes ``arch`` (ParamError for an unknown name)."""
    return family_named(get_arch(arch).family)


def family_named(name: str) -> Family:
    """The ``FAMILY`` of module ``trainer.models.<name>`` (a name from the registry only)."""
    return importlib.import_module(f"trainer.models.{name}").FAMILY


def new_model(arch: str, num_classes: int, widths: Any = None,
              input_size: int | None = None) -> nn.Module:
    """``arch`` with ``num_classes`` outputs at ``widths`` (None: unpruned), for images of
    ``input_size`` px a side (a dependency graph is traced at it; None: 32)."""
    return family(arch).build_at(arch, num_classes, widths, input_size)


def fresh_model(arch: str, num_classes: int, gamma: float, widths: Any = None,
                input_size: int | None = None) -> nn.Module:
    """The model ``train`` starts from without --init (seed the RNG first), at ``widths``
    (None: unpruned): every BatchNorm γ at ``gamma``, then what the family adds (the lab's
    ResNets: each block's last BN at 0)."""
    model = new_model(arch, num_classes, widths, input_size)
    family(arch).init_gamma(model, gamma)
    return model


def fresh_like(model: nn.Module, gamma: float) -> nn.Module:
    """A fresh model of ``model``'s architecture and widths (seed the RNG first), as
    :func:`fresh_model` initialises one: what ``train --scratch-from`` trains. Only the channel
    selections are ``model``'s: which channels each passes on is the architecture, not a
    weight."""
    new = fresh_model(model.arch, model.num_classes, gamma, model.widths,
                      getattr(model, "trace_size", None))
    for name, module in new.named_modules():
        if isinstance(module, ChannelSelection):
            module.load_state_dict(model.get_submodule(name).state_dict())
    return new


def detect_arch(state: dict) -> str | None:
    """The arch whose layout a bare state_dict has (official files name none), else None."""
    for name in dict.fromkeys(a.family for a in ARCHS.values()):
        arch = family_named(name).detect(state)
        if arch is not None:
            return arch
    return None

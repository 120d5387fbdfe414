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
from trainer.models.family import Family


def family(arch: str) -> Family:
    """The family that builds and prunes ``arch`` (ParamError for an unknown name)."""
    return family_named(get_arch(arch).family)


def family_named(name: str) -> Family:
    """The ``FAMILY`` of module ``trainer.models.<name>`` (a name from the registry only)."""
    return importlib.import_module(f"trainer.models.{name}").FAMILY


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
    for name in dict.fromkeys(a.family for a in ARCHS.values()):
        arch = family_named(name).detect(state)
        if arch is not None:
            return arch
    return None

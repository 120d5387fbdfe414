"""The user's own models (``--arch module.path:factory``, or a model object in Python), slimmed
through their dependency graph (``trainer.models.graph``).

The unpruned model comes from the factory the user named: the object given in Python, or the
name typed on the command line, imported here. A name the user did not give in this run is
refused before anything is imported (trainer.config.usercode); a file only names its model.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from torch import nn

from trainer.config.usercode import allowed, given_factory, parse_user_name
from trainer.errors import ConfigError, cut
from trainer.models.family import batchnorms
from trainer.models.graph import GraphFamily


def _import_factory(name: str) -> Callable[..., Any]:
    """The object ``module:factory`` names (the user typed it)."""
    module_name, path = parse_user_name(name)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--arch {name}: cannot import {module_name} ({cut(exc, 120)}); put "
                          "its folder on PYTHONPATH (or run from it)") from None
    for part in path.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"--arch {name}: {module_name} has no {path}; give the name of a "
                              "function or class in it that takes num_classes")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"--arch {name}: {path} is a {type(obj).__name__}, not a function or "
                          "class that takes num_classes")
    return obj


def factory_of(name: str) -> Callable[..., Any]:
    """The factory of the user model ``name``, if the user named it in this run."""
    if not allowed(name):
        raise ConfigError(f"{name} is your own code and was not named in this run; slimtune "
                          f"imports no code a file names: give --arch {name} (Python: the "
                          "factory or model object)")
    return given_factory(name) or _import_factory(name)


class UserFamily(GraphFamily):
    def unpruned(self, arch: str, num_classes: int) -> nn.Module:
        factory = factory_of(arch)
        try:
            model = factory(num_classes=num_classes)
        except TypeError as exc:
            raise ConfigError(f"--arch {arch}: calling it with num_classes={num_classes} failed "
                              f"({cut(exc, 160)}); the factory must take num_classes") from None
        if not isinstance(model, nn.Module):
            raise ConfigError(f"--arch {arch} returned a {type(model).__name__}, not a "
                              "torch.nn.Module; give a factory that builds your model")
        if not batchnorms(model):
            raise ConfigError(f"--arch {arch} has no BatchNorm2d layers, and network slimming "
                              "prunes by BatchNorm γ; add BatchNorm2d after its convolutions")
        return model


FAMILY = UserFamily()

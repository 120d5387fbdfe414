"""Naming, saving and loading models: slimtune's own and the user's.

A model slimtune has handled carries three plain attributes: ``arch`` (its name: a registry
name such as ``resnet18``, or ``module.path:factory`` for the user's own model), ``num_classes``
and ``widths`` (its channel widths; for a user model the pruning history that rebuilds it from
the factory's model). :func:`named` adds them to a user's model (in place).
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.config.archs import get_arch, user_arch_name
from trainer.config.usercode import allowing
from trainer.errors import ParamError, UserError
from trainer.files.checkpoint import build_model, load_checkpoint, make_checkpoint
from trainer.files.checkpoint import save_checkpoint as _save_pth
from trainer.files.safetensors_io import save_safetensors
from trainer.models.build import new_model
from trainer.models.family import unwrap_model

Factory = Callable[..., nn.Module]


def name_of(obj: Any) -> str:
    """``module:qualname`` of a function or class, or of a model's class (the part after a
    ``<locals>`` is kept: the name is what ``slimtune.load(..., factory=)`` compares)."""
    target = obj if inspect.isfunction(obj) or inspect.isclass(obj) else type(obj)
    return f"{target.__module__}:{target.__qualname__.rsplit('<locals>.', 1)[-1]}"


def _check_module(model: Any, param: str = "model") -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{param} must be a torch.nn.Module; got {type(model).__name__}")
    return unwrap_model(model)


def _is_named(model: nn.Module) -> bool:
    arch = getattr(model, "arch", None)
    if not isinstance(arch, str) or not hasattr(model, "widths") or \
            not hasattr(model, "num_classes"):
        return False
    try:
        get_arch(arch)
    except UserError:
        return False
    return True


def _factory_name(factory: Factory | str, param: str = "factory") -> str:
    """The ``module:name`` of a user model's factory (a name slimtune can store and check)."""
    if not isinstance(factory, str) and not callable(factory):
        raise TypeError(f"{param} must be a function or class that takes num_classes, or its "
                        f"'module:name'; got {type(factory).__name__}")
    name = factory if isinstance(factory, str) else name_of(factory)
    if user_arch_name(name) is None:
        raise ParamError.value(param, name, " is not a module.path:factory name, e.g. "
                               "'mynets:make_net'", quote=True)
    try:
        get_arch(name)
    except ParamError as exc:  # said of this parameter, not of --arch
        raise ParamError(exc.template.replace("{arch}", "{" + param + "}"), param) from None
    return name


def example_of(model: nn.Module, example_inputs: Any = None) -> torch.Tensor:
    """The input a model is traced and counted at: ``example_inputs``, the model's own, or
    one 3x32x32 image, on the model's device."""
    example = example_inputs if example_inputs is not None else \
        getattr(model, "example_inputs", None)
    if example is None:
        example = torch.zeros(1, 3, 32, 32)
    if not isinstance(example, torch.Tensor) or example.dim() != 4:
        raise ParamError.value("example_inputs", type(example).__name__ if not isinstance(
            example, torch.Tensor) else tuple(example.shape),
            " is not an image batch; give a tensor of shape (1, 3, H, W)")
    param = next(model.parameters(), None)
    return example.detach().to(param.device if param is not None else "cpu")


def _classes_of(model: nn.Module, example: torch.Tensor) -> int:
    """The model's class count: the width of its output on ``example``."""
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(example)
    except Exception as exc:  # noqa: BLE001 -- any failure: the model does not take this input
        raise ParamError.value("example_inputs", tuple(example.shape), f": the model does not "
                               f"run on it ({type(exc).__name__}: {str(exc)[:120]}); give an "
                               "input it takes") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ParamError("{model} must return class scores of shape (batch, classes); it "
                         f"returned {type(out).__name__}", "model")
    return int(out.shape[1])


def named(model: nn.Module, factory: Factory | str | None = None,
          example_inputs: torch.Tensor | None = None) -> nn.Module:
    """``model`` with ``arch``, ``num_classes`` and ``widths`` (set in place on a model that
    has none): a user model's name is its ``factory``'s (default: its class's), its class
    count the width of its output, its pruning history empty (unpruned)."""
    bare = _check_module(model)
    if factory is not None:
        name = _factory_name(factory)
        if _is_named(bare) and bare.arch != name and not user_arch_name(bare.arch):
            raise ParamError(f"{{factory}} {name} was given for a {bare.arch} (slimtune's "
                             "own architecture, named already)", "factory")
        if _is_named(bare):
            bare.arch = name
            return bare
    elif _is_named(bare):
        return bare
    else:
        name = _factory_name(name_of(bare), "model")
    if example_inputs is not None:
        bare.example_inputs = example_of(bare, example_inputs)
    bare.arch, bare.widths = name, []
    bare.num_classes = _classes_of(bare, example_of(bare))
    return bare


def create_model(arch: str, num_classes: int = 10) -> nn.Module:
    """A fresh, unpruned model of one of slimtune's architectures (``resnet18``, ``vgg16``,
    ``torchvision:resnet18``, ...), as ``train --arch`` builds it."""
    if user_arch_name(arch):
        raise ParamError.value("arch", arch, ": build your own model yourself (call its "
                               "factory); slimtune takes it as it is", quote=True)
    return new_model(arch, num_classes)


def save(model: nn.Module, path: str | os.PathLike, *,
         factory: Factory | str | None = None) -> Path:
    """Write ``model`` as the file the CLI reads (``.safetensors`` by its suffix, else a
    ``torch.load(weights_only=True)`` dict): its name, class count, pruning history (``cfg``),
    state_dict and the report of its last prune. ``factory``: the function or class (or its
    ``'module:name'``) that makes the unpruned model from ``num_classes``; default: the
    model's class. Returns the path."""
    bare = named(model, factory)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike; got {type(path).__name__}")
    path = Path(path)
    if path.is_dir():
        raise ParamError.value("path", str(path), " is a folder; give a file name, e.g. "
                               "'model.pth'", quote=True)
    example = getattr(bare, "example_inputs", None)
    config = {"image_size": int(example.shape[-1])} if example is not None else None
    ckpt = make_checkpoint(bare, prune=getattr(bare, "prune_record", None), config=config)
    if path.suffix.lower() == ".safetensors":
        save_safetensors(path, ckpt)
    else:
        _save_pth(path, ckpt)
    return path


def load(path: str | os.PathLike, *, factory: Factory | str | None = None,
         model: nn.Module | None = None, arch: str | None = None,
         device: str | torch.device | None = None) -> nn.Module:
    """The model a file holds, with its weights: any file the CLI reads (slimtune's, the lab's,
    the network-slimming code's, ``.safetensors``, a bare state_dict of a known arch).

    A file of the user's own model is loaded only when its code is named here, never because
    the file names it: ``factory`` (the function or class, or its ``'module:name'``, that the
    file was saved with) or ``model`` (an unpruned instance: the file's pruning history is
    replayed on a copy of it). ``arch``: the architecture of a bare state_dict (as ``--arch``).
    """
    if factory is not None and model is not None:
        raise ParamError("give {factory} or {model}, not both", "factory", "model")
    name, build = None, None
    if factory is not None:
        name, build = _factory_name(factory), None if isinstance(factory, str) else factory
    elif model is not None:
        name, build = _template(model)
    with allowing(user_arch_name(name), build):
        ckpt = load_checkpoint(os.fspath(path), arch or name)
        loaded = build_model(ckpt)
    if ckpt.get("prune"):
        loaded.prune_record = dict(ckpt["prune"])
    size = (ckpt.get("config") or {}).get("image_size")
    if user_arch_name(loaded.arch) and isinstance(size, int) and size != 32:
        loaded.example_inputs = torch.zeros(1, 3, size, size)
    return loaded if device is None else loaded.to(device)


def _template(model: nn.Module) -> tuple[str, Factory]:
    """The name of an unpruned model object and a factory that copies it."""
    bare = _check_module(model)
    if getattr(bare, "widths", None):
        raise ParamError("{model} must be an unpruned instance of the file's model (its "
                         "pruning history is replayed on a copy); give a fresh one", "model")
    name = bare.arch if _is_named(bare) else _factory_name(name_of(bare), "model")

    def copy_of(num_classes: int) -> nn.Module:
        device = torch.get_default_device()  # meta while a file's shapes are checked
        new = copy.deepcopy(bare)
        return new if device.type == "cpu" else new.to(device)

    return name, copy_of

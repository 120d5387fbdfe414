"""The model ``train --init FILE`` starts from: a slimtune or lab checkpoint, or a plain
state_dict as torchvision and timm publish them (``.pth`` or ``.safetensors``, with or without
``module.`` prefixes), for the arch the file names or ``--arch`` gives.

A file trained on another class count keeps every weight but its classifier (the model's last
Linear), which is replaced by a freshly initialised one for the data set's classes; any other
layer whose shape differs refuses the file (``trainer.files.checkpoint.check_state_dict`` names
the first).
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

from trainer.files.checkpoint import classifier_key, load_checkpoint
from trainer.models.build import new_model


class Start(NamedTuple):
    """The initial model, and the classifier it replaced: (layer, the file's classes) or None."""

    model: nn.Module
    replaced: tuple[str, int] | None


def initial_model(path, arch: str | None, num_classes: int, input_size: int) -> Start:
    """The model of ``path`` (its own arch, else ``arch``) for ``num_classes`` classes, its
    graph traced at ``input_size`` px. Seed the RNG first: a replaced classifier is drawn."""
    ckpt = load_checkpoint(path, arch)
    model = new_model(ckpt["arch"], num_classes, ckpt["cfg"], input_size)
    if ckpt["num_classes"] == num_classes:
        model.load_state_dict(ckpt["state_dict"])
        return Start(model, None)
    layer = classifier_key(ckpt["arch"]).rsplit(".", 1)[0]
    own = model.state_dict()
    state = {k: v for k, v in ckpt["state_dict"].items() if _layer_of(k) != layer}
    state.update({k: v for k, v in own.items() if _layer_of(k) == layer})  # fresh, as built
    model.load_state_dict(state)
    return Start(model, (layer, int(ckpt["num_classes"])))


def _layer_of(key: str) -> str:
    return key.rsplit(".", 1)[0]

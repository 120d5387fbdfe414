"""``slimtune.profile`` and ``slimtune.evaluate``: what a model costs and how well it does."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from slimtune.models import named
from trainer.errors import ParamError
from trainer.measure.profiling import (
    MAX_INPUT_SIZE,
    MIN_INPUT_SIZE,
    check_input_fits,
    measure_latency,
    profile_model,
)


def profile(model: nn.Module, input_size: int = 32, *, latency: bool = False,
            device: str = "cpu", batch_sizes: Sequence[int] = (1,), warmup: int = 5,
            repeats: int = 20) -> dict[str, Any]:
    """Params, MACs (multiply-accumulates, thop) and FLOPs (= 2 x MACs) of ``model`` at one
    ``input_size`` x ``input_size`` image: ``{"params", "macs", "flops", "input_size"}``. With
    ``latency``, also ``"latency"``: milliseconds per batch (median, min, max) and images/s
    for each of ``batch_sizes`` on ``device``, after ``warmup`` untimed passes, over
    ``repeats`` rounds. The model is measured on copies (it is untouched)."""
    bare = named(model)
    if isinstance(input_size, bool) or not isinstance(input_size, int) or \
            not MIN_INPUT_SIZE <= input_size <= MAX_INPUT_SIZE:
        raise ParamError.value("input_size", input_size, " is not an integer from "
                               f"{MIN_INPUT_SIZE} to {MAX_INPUT_SIZE} (pixels per side)")
    check_input_fits(bare, input_size, "input_size")
    out: dict[str, Any] = profile_model(bare, input_size)
    if latency:
        out["latency"] = measure_latency(bare, device, input_size, tuple(batch_sizes), warmup,
                                         repeats)
    return out


def as_loader(data: Any, batch_size: int, shuffle: bool, param: str = "data") -> Iterable:
    """A DataLoader over ``data`` (a Dataset of (image, label)), or ``data`` itself when it
    already yields batches (a DataLoader or any iterable of (images, labels))."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ParamError.value("batch_size", batch_size, " is not a positive integer")
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle)
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        return data
    raise TypeError(f"{param} must be a Dataset of (image, label) or a DataLoader; got "
                    f"{type(data).__name__}")


def model_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """``device``, else where the model's weights are."""
    if device is not None:
        return torch.device(device)
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def evaluate(model: nn.Module, data: Any, *, batch_size: int = 100,
             device: str | torch.device | None = None) -> dict[str, float]:
    """Test loss and accuracy of ``model`` over all of ``data`` (a Dataset of (image, label)
    or a DataLoader), in eval mode, in float32: ``{"loss", "accuracy" (%), "correct",
    "total"}``. ``device``: where to run (default: the model's). The model's mode is kept."""
    loader = as_loader(data, batch_size, shuffle=False)
    dev = model_device(model, device)
    was_training = model.training
    model.to(dev).eval()
    loss = correct = total = 0.0
    try:
        for x, y in loader:
            x, y = x.to(dev).float(), y.to(dev)
            out = model(x).float()
            loss += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            total += y.numel()
    finally:
        model.train(was_training)
    if not total:
        raise ParamError("{data} holds no samples", "data")
    return {"loss": loss / total, "accuracy": 100.0 * correct / total, "correct": int(correct),
            "total": int(total)}

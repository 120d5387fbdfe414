"""``slimtune.finetune``: the CLI's fine-tuning recipe in one process, on one device."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.measure import as_loader, evaluate, model_device
from trainer.errors import ParamError
from trainer.train.loop import add_sparsity_grad, decayed, kd_loss, set_lr


def _positive(param: str, value: Any, kind: type = int) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ParamError.value(param, value, f" is not a positive {kind.__name__}")


def finetune(model: nn.Module, train_data: Any, test_data: Any = None, *, epochs: int = 20,
             lr: float = 1e-3, batch_size: int = 100, weight_decay: float = 0.0,
             teacher: nn.Module | None = None, kd_alpha: float = 0.9,
             kd_temperature: float = 4.0, sparsity: float = 0.0,
             device: str | torch.device | None = None, seed: int = 0
             ) -> tuple[nn.Module, dict[str, list[float]]]:
    """Fine-tune ``model`` in place with slimtune's recipe: Adam at ``lr``, divided by 10 at
    50% and 75% of ``epochs``, float32; returns ``(model, history)``.

    ``train_data``/``test_data``: Datasets of (image, label) or DataLoaders. With
    ``test_data`` the model ends with the weights of its best epoch (test accuracy), as
    ``slimtune finetune`` keeps its best checkpoint; ``history`` holds per epoch ``epoch``,
    ``lr``, ``train_loss``, ``test_loss`` and ``test_acc``. With a ``teacher`` (same classes)
    the loss is α·T²·KL(teacher‖student) + (1−α)·CE (``kd_alpha``, ``kd_temperature``);
    ``sparsity`` λ > 0 adds network slimming's L1 term on BatchNorm γ. One process on
    ``device`` (default: the model's); for several GPUs save the model and run the CLI."""
    _positive("epochs", epochs)
    _positive("lr", lr, float)
    if not 0 <= kd_alpha <= 1:
        raise ParamError.value("kd_alpha", kd_alpha, " is outside [0, 1]")
    torch.manual_seed(seed)
    loader = as_loader(train_data, batch_size, shuffle=True, param="train_data")
    dev = model_device(model, device)
    model.to(dev)
    if teacher is not None:
        teacher.to(dev).eval()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    history: dict[str, list[float]] = {k: [] for k in ("epoch", "lr", "train_loss",
                                                       "test_loss", "test_acc")}
    best, best_state = -1.0, None
    for epoch in range(epochs):
        rate = decayed(lr, epochs, epoch)
        set_lr(optimizer, rate)
        train_loss = _epoch(model, loader, optimizer, dev, teacher, kd_alpha, kd_temperature,
                            sparsity)
        history["epoch"].append(epoch + 1)
        history["lr"].append(rate)
        history["train_loss"].append(train_loss)
        if test_data is not None:
            metrics = evaluate(model, test_data, batch_size=batch_size, device=dev)
            history["test_loss"].append(metrics["loss"])
            history["test_acc"].append(metrics["accuracy"])
            if metrics["accuracy"] > best:
                best, best_state = metrics["accuracy"], copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    return model, history


def _epoch(model: nn.Module, loader, optimizer, dev: torch.device, teacher, alpha: float,
           temperature: float, sparsity: float) -> float:
    """One pass over ``loader``; the mean training loss."""
    model.train()
    total = count = 0.0
    for x, y in loader:
        x, y = x.to(dev).float(), y.to(dev)
        out = model(x).float()
        loss = F.cross_entropy(out, y)
        if teacher is not None:
            with torch.no_grad():
                soft = teacher(x).float()
            loss = kd_loss(out, soft, loss, alpha, temperature)
        if not torch.isfinite(loss):
            raise ParamError("the loss became non-finite; lower {lr}", "lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        add_sparsity_grad(model, sparsity)
        optimizer.step()
        total += float(loss.detach()) * y.numel()
        count += y.numel()
    return total / max(count, 1)

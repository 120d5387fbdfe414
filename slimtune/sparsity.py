"""``slimtune.Sparsity``: network slimming's L1 term on BatchNorm γ, in the user's own loop."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from trainer.errors import ParamError
from trainer.models.family import unwrap_model
from trainer.train.loop import add_sparsity_grad


class Sparsity:
    """Adds λ·sign(γ) to the gradient of every BatchNorm weight γ: the sub-gradient of
    λ·Σ|γ| (Liu et al. 2017), which drives the γ of unneeded channels towards 0 for
    :func:`slimtune.prune` to remove.

    Call :meth:`step` once per optimizer step, after ``loss.backward()`` (and after DDP's
    gradient all-reduce, i.e. the last micro-batch's backward) and before
    ``optimizer.step()``. Under fp16 the gradients are still multiplied by the loss scale
    then, and a term added to them would shrink by that factor (2**16 at first): give the
    ``scaler`` (a ``torch.amp.GradScaler``) and the ``optimizer``, and :meth:`step` unscales
    the gradients first (``scaler.step`` then does not divide again). With Accelerate give
    ``accelerator=`` and the prepared ``optimizer``: its scaler (fp16) is used the same way;
    bf16 and fp32 need none.
    """

    def __init__(self, model: nn.Module, lam: float = 1e-4, *, optimizer: Any = None,
                 scaler: Any = None, accelerator: Any = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or \
                not math.isfinite(lam) or lam < 0:
            raise ParamError.value("lam", lam, " is not a finite number >= 0; the paper's "
                                   "values are 1e-5 to 1e-4")
        if scaler is not None and accelerator is not None:
            raise ParamError("give {scaler} or {accelerator}, not both", "scaler",
                             "accelerator")
        if (scaler is not None or accelerator is not None) and optimizer is None:
            raise ParamError("{optimizer} is needed with a scaler or accelerator: the "
                             "gradients are unscaled per optimizer", "optimizer")
        self.bns = [m for m in unwrap_model(model).modules()
                    if isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)) and m.weight is not None]
        if not self.bns:
            raise ParamError("{model} has no BatchNorm2d layers with a weight; network slimming "
                             "acts on BatchNorm γ", "model")
        self.model, self.lam, self.optimizer = model, float(lam), optimizer
        self.scaler = scaler if scaler is not None else getattr(accelerator, "scaler", None)

    def step(self) -> None:
        """Add λ·sign(γ) to the BatchNorm weights' gradients (unscaled first under fp16)."""
        if self.lam <= 0:
            return
        if self.scaler is not None and self.scaler.is_enabled():
            _unscale(self.scaler, self.optimizer)
        add_sparsity_grad(self.model, self.lam)

    def penalty(self) -> float:
        """λ·Σ|γ| over every BatchNorm now (the term's value, for logging)."""
        with torch.no_grad():
            return self.lam * float(sum(bn.weight.abs().sum().item() for bn in self.bns))


def _unscale(scaler: Any, optimizer: Any) -> None:
    """``scaler.unscale_(optimizer)`` unless the loop already did (e.g. to clip gradients)."""
    try:
        scaler.unscale_(getattr(optimizer, "optimizer", optimizer))
    except RuntimeError as exc:
        if "already been called" not in str(exc):
            raise

"""Self-describing, safely loaded, atomically written checkpoints.

A checkpoint is a plain dict that ``torch.load(path, weights_only=True)`` accepts::

    format_version, arch, num_classes, cfg (the 49 channel widths), state_dict (unwrapped),
    and where they apply: history, best_acc, best_epoch, config, prune

The lab's bare ``{cfg, state_dict}`` files (with or without ``module.`` prefixes) load too.
The key stays ``cfg`` for the lab's files; in code the list is called ``widths``.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.errors import CheckpointError
from trainer.files import atomic_path
from trainer.models import (
    ARCH,
    ResNet50,
    bn_names,
    effective_widths,
    unwrap_model,
    validate_widths,
)

FORMAT_VERSION = 1
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_THOP_SUFFIXES = ("total_ops", "total_params")
HISTORY_KEYS = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc")


def clean_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes (``module.``, ``_orig_mod.``) and thop's counting buffers."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        if key.rsplit(".", 1)[-1] in _THOP_SUFFIXES:
            continue
        out[key] = value
    return out


def make_checkpoint(model: nn.Module, **extra: Any) -> dict[str, Any]:
    """A checkpoint dict for ``model`` (unwrapped, tensors moved to CPU) plus ``extra`` fields."""
    bare = unwrap_model(model)
    state = {k: v.detach().cpu().clone() for k, v in clean_state_dict(bare.state_dict()).items()}
    ckpt = {
        "format_version": FORMAT_VERSION,
        "arch": ARCH,
        "num_classes": int(bare.fc.out_features),
        "cfg": list(bare.widths),
        "state_dict": state,
    }
    ckpt.update({k: v for k, v in extra.items() if v is not None})
    return ckpt


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file in the same folder, then ``os.replace`` (trainer.files).

    A crash leaves either the old file or the new one, never a truncated file.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)


def save_checkpoint(path: str | os.PathLike, ckpt: Mapping[str, Any]) -> None:
    """Atomically save a checkpoint dict (see :func:`make_checkpoint`)."""
    atomic_torch_save(dict(ckpt), path)


def safe_torch_load(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """``torch.load(weights_only=True)`` with every failure turned into a CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} {path} does not exist; check the path")
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a folder; give the path of a .pth file")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{what} {path} is not readable; check its permissions")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "GLOBAL" in text:  # torch 2.4+: "Unsupported global: GLOBAL mod.name ..."
            raise CheckpointError(
                f"{what} {path} was refused: it holds objects other than tensors and plain "
                "values, and loading it would run code (it was not run); re-save it as "
                "{cfg, state_dict} from the environment that made it"
            ) from None
        if "weights_only" in text or "Weights only load failed" in text:
            # Not a torch file at all (text, image, random bytes) or a pickle using opcodes
            # the safe loader refuses: either way nothing in it was executed.
            raise CheckpointError(
                f"{what} {path} is not a torch checkpoint the safe loader can read "
                f"(weights_only=True refused it: {_weights_only_reason(text)}; nothing in it "
                "was run); give a .pth file written by torch.save"
            ) from None
        raise CheckpointError(
            f"{what} {path} is not a valid torch file ({_first_line(exc)})") from None
    except OSError as exc:  # it exists, but reading fails (permissions, I/O error)
        raise CheckpointError(f"{what} {path} cannot be read ({exc.strerror or _first_line(exc)}); "
                              "check the file, its permissions and the disk") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        msg = _first_line(exc)
        hint = "truncated or corrupt" if _looks_truncated(msg) else "not a torch checkpoint"
        raise CheckpointError(
            f"{what} {path} is {hint} ({msg}); re-create or re-download it") from None
    except Exception as exc:  # noqa: BLE001 -- the legacy loader fails on junk in many ways
        # (a text file: KeyError from the magic-number lookup; struct.error; ...)
        raise CheckpointError(
            f"{what} {path} is not a torch checkpoint ({type(exc).__name__}: "
            f"{_first_line(exc)}); give a .pth file written by torch.save") from None


def _weights_only_reason(text: str) -> str:
    """The informative line of torch's long weights_only error (e.g. 'Unsupported operand 123')."""
    for line in text.splitlines():
        if line.strip().startswith("Unsupported"):
            return line.strip()[:120]
    return "unsupported content"


def _first_line(exc: BaseException) -> str:
    """The first sentence of the first line (torch appends paragraphs of advice)."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line.split(". ")[0][:200]


def _looks_truncated(msg: str) -> bool:
    return any(s in msg for s in ("central directory", "EOF", "truncated", "unexpected end",
                                  "failed finding"))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load and validate a checkpoint (slimtune or lab format); tensors on CPU.

    Returns a normalized dict with at least ``format_version``, ``arch``, ``num_classes``,
    ``cfg`` and a clean ``state_dict`` whose shapes agree with ``cfg``.
    """
    raw = safe_torch_load(path)
    if not isinstance(raw, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(raw).__name__}, not a checkpoint dict; expected at least "
            "{cfg, state_dict}"
        )
    arch = raw.get("arch", ARCH)
    if arch != ARCH:
        raise CheckpointError(f"{path} is a {arch!r} checkpoint; slimtune works on {ARCH!r} only")
    if raw.get("kind") == "resume" and isinstance(raw.get("model"), Mapping):
        # a run's <stem>.last.pth: the weights of its last finished epoch (not its best)
        raw = {"cfg": _widths_from_shapes(path, clean_state_dict(raw["model"])),
               "state_dict": raw["model"],
               **{k: raw[k] for k in ("history", "config") if k in raw}}
    if "cfg" not in raw and raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
        raw = {"cfg": _widths_from_shapes(path, clean_state_dict(raw)), "state_dict": raw}
    for key in ("cfg", "state_dict"):
        if key not in raw:
            keys = [str(k) for k in raw]
            shown = ", ".join(keys[:5]) + (f", ... ({len(keys)} keys)" if len(keys) > 5 else "")
            raise CheckpointError(
                f"{path} has no '{key}' (keys: {shown or 'none'}); "
                "expected a checkpoint with cfg and state_dict"
            )
    if not isinstance(raw["state_dict"], Mapping):
        kind = type(raw["state_dict"]).__name__
        raise CheckpointError(f"{path}: 'state_dict' is a {kind}, not a dict")
    state = clean_state_dict(raw["state_dict"])
    _check_types(path, raw, state)
    try:
        widths = validate_widths(raw["cfg"])
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    if "fc.weight" not in state:
        raise CheckpointError(f"{path} has no fc.weight; it is not a {ARCH} state_dict")
    num_classes = raw.get("num_classes")
    if num_classes is None:
        num_classes = int(state["fc.weight"].shape[0])
    check_state_dict(state, widths, num_classes, source=str(path))
    ckpt = dict(raw)
    ckpt.update(format_version=raw.get("format_version", 0), arch=ARCH,
                num_classes=num_classes, cfg=widths, state_dict=state)
    if isinstance(raw.get("best_acc"), torch.Tensor):  # a lab file's: plain values from here on
        ckpt["best_acc"] = raw["best_acc"].item()
    if isinstance(raw.get("history"), Mapping):
        ckpt["history"] = {k: [x.item() if isinstance(x, torch.Tensor) else x for x in v]
                           for k, v in raw["history"].items()}
    return ckpt


_NUMBER = (int, float, torch.Tensor)  # a lab file may keep accuracies as 1-element tensors
# The fields info/profile/compare read, and the types a slimtune or lab file gives them
# (None is allowed for each). A file edited by hand fails here in one line, not in a report.
_TYPES = {"num_classes": int, "best_acc": _NUMBER, "best_epoch": int, "history": Mapping,
          "prune": Mapping, "config": Mapping}
_PRUNE_TYPES = {"ratio": _NUMBER, "threshold": _NUMBER, "scope": str, "min_channels": int,
                "source": str, "params_before": int, "params_after": int,
                "acc_before": _NUMBER, "acc_after": _NUMBER}


def _check_types(path, raw: Mapping, state: Mapping) -> None:
    fields = [(k, raw.get(k), t) for k, t in _TYPES.items()]
    fields += [(f"prune.{k}", (raw.get("prune") or {}).get(k), t) for k, t in _PRUNE_TYPES.items()
               if isinstance(raw.get("prune"), Mapping)]
    if isinstance(raw.get("history"), Mapping):
        fields += [(f"history.{k}", v, (list, tuple)) for k, v in raw["history"].items()]
        fields += [(f"history.{k}[{i}]", x, _NUMBER) for k, v in raw["history"].items()
                   if isinstance(v, (list, tuple)) for i, x in enumerate(v)]
    for name, value, kind in fields:
        odd_tensor = isinstance(value, torch.Tensor) and (kind is not _NUMBER or value.numel() != 1)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)
                                  or odd_tensor):
            raise CheckpointError(f"{path}: {name} is a {type(value).__name__} ({value!r:.40}), "
                                  "not what slimtune writes; the file was edited or damaged: "
                                  "re-create it")
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CheckpointError(f"{path}: state_dict entry {bad!r} is a "
                              f"{type(state[bad]).__name__}, not a tensor; the file was edited "
                              "or damaged: re-create it")


def _widths_from_shapes(path: str | os.PathLike,
                        state: Mapping[str, torch.Tensor]) -> list[int]:
    """The widths of a bare state_dict (``torch.save(model.state_dict())``): each BatchNorm's
    width."""
    try:
        return [int(state[f"{name}.weight"].shape[0]) for name in bn_names()]
    except KeyError:
        raise CheckpointError(
            f"{path} is a bare state_dict ({len(state)} tensors, first {next(iter(state))!r}) "
            "that is not the lab ResNet-50's; give a slimtune or lab checkpoint "
            "{cfg, state_dict}") from None


def check_state_dict(state: Mapping[str, torch.Tensor], widths: list[int], num_classes: int,
                     source: str = "checkpoint") -> None:
    """Raise CheckpointError if ``state`` does not fit ``ResNet50(num_classes, widths)``."""
    with torch.device("meta"):
        expected = ResNet50(num_classes, widths).state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    for key, ref in expected.items():
        if key in state and tuple(state[key].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(state[key].shape)} but the cfg "
                f"({_cfg_entry_for(key, widths)}) expects {tuple(ref.shape)}; "
                "cfg and state_dict disagree"
            )
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]})")
        raise CheckpointError(f"{source}: state_dict does not match {ARCH}: {'; '.join(parts)}")


def _cfg_entry_for(key: str, widths: list[int]) -> str:
    names = bn_names()
    eff = effective_widths(widths)
    layer = key.rsplit(".", 1)[0]
    for i, name in enumerate(names):
        if layer == name or layer == name.replace("bn", "conv"):
            return f"cfg[{i}]={eff[i]} for {name}"
    return "cfg"


def build_model(ckpt: Mapping[str, Any]) -> ResNet50:
    """Rebuild the model a loaded checkpoint describes, with its weights."""
    model = ResNet50(int(ckpt["num_classes"]), ckpt["cfg"])
    model.load_state_dict(ckpt["state_dict"])
    return model


def summarize_history(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """best_acc / best_epoch / epochs of a checkpoint's history (None when absent)."""
    hist = ckpt.get("history") or {}
    accs = list(hist.get("test_acc", []))
    best = ckpt.get("best_acc", max(accs) if accs else None)
    best_epoch = ckpt.get("best_epoch")
    if best_epoch is None and accs:
        best_epoch = hist.get("epoch", list(range(1, len(accs) + 1)))[accs.index(max(accs))]
    return {"best_acc": best, "best_epoch": best_epoch, "epochs": len(accs)}

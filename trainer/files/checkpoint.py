"""Self-describing, safely loaded, atomically written checkpoints.

A checkpoint is a plain dict that ``torch.load(path, weights_only=True)`` accepts::

    format_version, arch, num_classes, cfg (the model's channel widths), state_dict
    (unwrapped), and where they apply: history, best_acc, best_epoch, config, prune

``arch`` is looked up in slimtune's own table (trainer.config.archs); ``cfg`` is what its family
rebuilds the model from (the key keeps the lab's name; in code it is ``widths``). The lab's
bare ``{cfg, state_dict}`` files (with or without ``module.`` prefixes), the network-slimming
code's files and bare state_dicts load too: a file that names no arch is taken for what
``--arch`` says, else for what its keys show, else for the lab's ResNet-50.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from trainer.config.archs import ARCHS, DEFAULT_ARCH, PREFIXES, get_arch, user_arch_name
from trainer.config.usercode import HOW, allowed, looks_like_user_name, refusal
from trainer.errors import CheckpointError, UserError, cut, shown
from trainer.files.atomic import atomic_path
from trainer.files.safeload import safe_torch_load
from trainer.files.safetensors_io import is_safetensors, load_safetensors
from trainer.models.build import detect_arch, family, new_model
from trainer.models.family import unwrap_model

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
        "arch": bare.arch,
        "num_classes": int(bare.num_classes),
        "cfg": _plain(bare.widths),
        "state_dict": state,
    }
    ckpt.update({k: v for k, v in extra.items() if v is not None})
    return ckpt


def _plain(value: Any) -> Any:
    """Lists all the way down (a torchvision model's widths nest lists)."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file in the same folder, then ``os.replace`` (trainer.files.atomic).

    A crash leaves either the old file or the new one, never a truncated file.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)


def save_checkpoint(path: str | os.PathLike, ckpt: Mapping[str, Any]) -> None:
    """Atomically save a checkpoint dict (see :func:`make_checkpoint`)."""
    atomic_torch_save(dict(ckpt), path)


def load_checkpoint(path: str | os.PathLike, arch: str | None = None) -> dict[str, Any]:
    """Load and validate a checkpoint (slimtune, lab or network-slimming format); tensors on
    CPU. ``arch``: the architecture of a file that names none (default: what its keys show).

    Returns a normalized dict with at least ``format_version``, ``arch``, ``num_classes``,
    ``cfg`` and a clean ``state_dict`` whose shapes agree with ``cfg``.
    """
    raw = _as_checkpoint(path, load_safetensors(path) if is_safetensors(path)
                         else safe_torch_load(path))
    state = clean_state_dict(raw["state_dict"])
    name = _arch_of(path, raw, state, arch)
    _check_types(path, raw, state)
    try:
        widths, num_classes = _shape_of(path, raw, state, name)
    except UserError as exc:
        raise _as_the_files(exc, path, raw, name) from None
    return _checked(path, raw, state, name, widths, num_classes)


def _shape_of(path, raw: Mapping, state: Mapping, name: str) -> tuple[Any, int]:
    """The checked widths and class count of the file's model (CheckpointError if its
    state_dict does not fit them)."""
    fam = family(name)
    try:
        widths = fam.check_widths(name, _widths_of(path, raw, state, name))
    except ValueError as exc:
        raise CheckpointError(f"{path}: {cut(exc, 300)}") from None
    num_classes = raw.get("num_classes")
    if num_classes is None:
        key = classifier_key(name)
        if key not in state:
            raise CheckpointError(f"{path} has no {key}; it is not a {name} state_dict")
        num_classes = int(state[key].shape[0])
    check_state_dict(state, name, widths, num_classes, source=str(path),
                     input_size=trained_input_size(raw))
    return widths, num_classes


def _as_the_files(exc: UserError, path, raw: Mapping, name: str) -> UserError:
    """A family's error about ``--arch NAME``, said of the file when the name is the file's
    own (the user gave no --arch)."""
    text, flag = str(exc), f"--arch {name}"
    if raw.get("arch") and text.startswith(flag):
        return CheckpointError(f"{path}: the checkpoint's arch {name}{text[len(flag):]}")
    return exc


def _checked(path, raw: Mapping, state: Mapping, name: str, widths: Any,
             num_classes: int) -> dict[str, Any]:
    ckpt = {k: v for k, v in raw.items() if k != "bare"}
    ckpt.update(format_version=raw.get("format_version", 0), arch=name,
                num_classes=num_classes, cfg=widths, state_dict=state)
    if isinstance(raw.get("best_acc"), torch.Tensor):  # a lab file's: plain values from here on
        ckpt["best_acc"] = raw["best_acc"].item()
    if isinstance(raw.get("history"), Mapping):
        ckpt["history"] = {k: [x.item() if isinstance(x, torch.Tensor) else x for x in v]
                           for k, v in raw["history"].items()}
    return ckpt


def _as_checkpoint(path, raw: Any) -> dict[str, Any]:
    """A checkpoint dict from what the file holds: a checkpoint, a run's resume state, or a
    bare state_dict (``torch.save(model.state_dict())``)."""
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path} holds a {type(raw).__name__}, not a checkpoint dict; "
                              "expected at least {cfg, state_dict}")
    if raw.get("kind") == "resume" and isinstance(raw.get("model"), Mapping):
        # a run's <stem>.last.pth: the weights of its last finished epoch (not its best)
        config = raw.get("config") if isinstance(raw.get("config"), Mapping) else {}
        return {**{k: raw[k] for k in ("arch", "cfg", "history", "config") if k in raw},
                "arch": raw.get("arch") or config.get("arch"), "state_dict": raw["model"],
                "kind": "resume"}
    if "cfg" not in raw and raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
        return {"state_dict": raw, "bare": True}
    if not isinstance(raw.get("state_dict"), Mapping):
        if "state_dict" in raw:
            kind = type(raw["state_dict"]).__name__
            raise CheckpointError(f"{path}: 'state_dict' is a {kind}, not a dict")
        missing = "cfg" if "cfg" not in raw else "state_dict"
        raise CheckpointError(f"{path} has no '{missing}' (keys: {_keys_text(raw)}); "
                              "expected a checkpoint with cfg and state_dict")
    return dict(raw)


def _keys_text(keys) -> str:
    """The first keys of a file's dict, each cut short: 'cfg, state_dict, ... (9 keys)'."""
    keys = [cut(str(k), 40) for k in keys]
    return ", ".join(keys[:5]) + (f", ... ({len(keys)} keys)" if len(keys) > 5 else "") or "none"


def _arch_of(path, raw: Mapping, state: Mapping, arch: str | None) -> str:
    """The file's own arch, else ``arch``, else what its keys show, else the lab's."""
    own = raw.get("arch")
    if own is not None and not isinstance(own, str):
        kind = type(own).__name__
        raise CheckpointError(f"{path}: the checkpoint's arch is {shown(own)} (a"
                              f"{'n' if kind[:1] in 'aeiou' else ''} {kind}), not an architecture "
                              "name; the file was edited or damaged: re-create it")
    name = own or arch or detect_arch(state) or DEFAULT_ARCH
    try:
        get_arch(name)
    except UserError as exc:  # an unknown name, said as a flag: say it is the file's
        if own is not None and looks_like_user_name(own):  # checked, never imported
            why = str(exc).split("; ")[0]  # the problem, not the command line's fix
            raise CheckpointError(f"{path}: the checkpoint's {why}; slimtune refuses the file "
                                  "(edited, or not written by slimtune)") from None
        known = [*ARCHS, *(f"{prefix}NAME" for prefix in PREFIXES)]
        raise CheckpointError(f"{path} names the architecture {shown(name)}, which slimtune does "
                              f"not know; it slims {', '.join(known)} and your own models "
                              f"({HOW}, named on the command line)") from None
    if user_arch_name(name) and not allowed(name):  # the user's code: only when named
        raise CheckpointError(refusal(path, name))
    return name


def _widths_of(path, raw: Mapping, state: Mapping, arch: str) -> Any:
    """The file's ``cfg``, or the widths its shapes show (a bare or official main.py file)."""
    if raw.get("cfg") is not None:
        return raw["cfg"]
    try:
        return family(arch).widths_from_state(arch, state)
    except (KeyError, IndexError):
        if raw.get("bare"):
            raise CheckpointError(
                f"{path} is a bare state_dict ({len(state)} tensors, first "
                f"{shown(next(iter(state), None))}) that is not the lab ResNet-50's nor another "
                "architecture slimtune knows; give a slimtune or lab checkpoint {cfg, "
                "state_dict}, or name its architecture with --arch") from None
        raise CheckpointError(f"{path} has no 'cfg' (keys: {_keys_text(raw)}) and its "
                              f"state_dict is not a {arch}'s; expected a checkpoint with cfg "
                              "and state_dict") from None


def classifier_key(arch: str) -> str:
    """The state_dict key of ``arch``'s final Linear weight (its class count)."""
    with torch.device("meta"):
        model = family(arch).build(arch, 2)
    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]


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
            raise CheckpointError(f"{path}: {cut(name, 80)} is a {type(value).__name__} "
                                  f"({value!r:.40}), "
                                  "not what slimtune writes; the file was edited or damaged: "
                                  "re-create it")
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CheckpointError(f"{path}: state_dict entry {shown(bad)} is a "
                              f"{type(state[bad]).__name__}, not a tensor; the file was edited "
                              "or damaged: re-create it")


def check_state_dict(state: Mapping[str, torch.Tensor], arch: str, widths: Any,
                     num_classes: int, source: str = "checkpoint",
                     input_size: int | None = None) -> None:
    """Raise CheckpointError if ``state`` does not fit ``arch`` at ``widths`` (a pruning
    history is replayed at ``input_size`` px)."""
    expected = _expected_shapes(arch, widths, num_classes, source, state, input_size)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    unpruned = widths == family(arch).default_widths(arch)
    for key, shape in expected.items():
        if key in state and tuple(state[key].shape) != shape:
            if unpruned:  # e.g. a published state_dict: the first layer that differs
                raise CheckpointError(f"{source}: {cut(key, 80)} has shape "
                                      f"{cut(tuple(state[key].shape), 80)} but an unpruned "
                                      f"{arch} has {cut(shape, 80)}; the file holds another "
                                      "model's weights (is the architecture right?)")
            entry = family(arch).widths_entry(arch, widths, key)
            raise CheckpointError(f"{source}: {cut(key, 80)} has shape "
                                  f"{cut(tuple(state[key].shape), 80)} but the cfg "
                                  f"({cut(entry, 120)}) expects {cut(shape, 80)}; cfg and "
                                  "state_dict disagree")
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (first: {cut(missing[0], 80)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: "
                         f"{cut(unexpected[0], 80)})")
        raise CheckpointError(f"{source}: state_dict does not match {arch}: {'; '.join(parts)}")


def _expected_shapes(arch: str, widths: Any, num_classes: int, source: str,
                     state: Mapping[str, torch.Tensor] | None = None,
                     input_size: int | None = None) -> dict[str, tuple[int, ...]]:
    fam = family(arch)
    try:
        try:
            with torch.device("meta"):  # shapes without weights: a file's claim costs nothing
                model = fam.build_at(arch, num_classes, widths, input_size)
        except NotImplementedError:  # a constructor that reads tensor values (RegNet's widths)
            return _shapes_without_meta(fam, arch, widths, num_classes, state, input_size)
    except (ValueError, AttributeError, IndexError, RuntimeError, NotImplementedError) as exc:
        raise CheckpointError(f"{source}: its cfg does not rebuild a {arch} ({type(exc).__name__}"
                              f": {str(exc)[:120]}); the file was edited or damaged") from None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _shapes_without_meta(fam, arch: str, widths: Any, num_classes: int,
                         state: Mapping[str, torch.Tensor] | None,
                         input_size: int | None = None) -> dict[str, tuple[int, ...]]:
    """Shapes of a model whose constructor cannot run on the meta device: its unpruned form
    with empty weights first (a 644M-parameter RegNet costs nothing so); the real model is
    built only to replay a pruning history, and only for a file whose keys are the model's
    (a small file claiming a huge model is refused before its weights are made)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        empty = fam.build(arch, num_classes, fam.default_widths(arch))
    shapes = {k: tuple(v.shape) for k, v in empty.state_dict().items()}
    if widths == fam.default_widths(arch) or (state is not None and set(state) != set(shapes)):
        return shapes  # unpruned: these are its shapes; other keys: check_state_dict says which
    model = fam.build_at(arch, num_classes, widths, input_size)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def build_model(ckpt: Mapping[str, Any]) -> nn.Module:
    """Rebuild the model a loaded checkpoint describes, with its weights."""
    model = new_model(ckpt["arch"], int(ckpt["num_classes"]), ckpt["cfg"],
                      trained_input_size(ckpt))  # a dependency graph is traced at it
    model.load_state_dict(ckpt["state_dict"])
    return model


DEFAULT_INPUT_SIZE = 32  # CIFAR: the size of a file that records none


def trained_input_size(ckpt: Mapping[str, Any]) -> int:
    """The image side a checkpoint's model was trained at (its saved ``image_size``), else 32:
    what profile, compare and export measure it at unless told otherwise."""
    size = (ckpt.get("config") or {}).get("image_size")
    ok = isinstance(size, int) and not isinstance(size, bool) and 1 <= size <= 4096
    return size if ok else DEFAULT_INPUT_SIZE


def summarize_history(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """best_acc / best_epoch / epochs of a checkpoint's history (None when absent)."""
    hist = ckpt.get("history") or {}
    accs = list(hist.get("test_acc", []))
    best = ckpt.get("best_acc", max(accs) if accs else None)
    best_epoch = ckpt.get("best_epoch")
    if best_epoch is None and accs:
        best_epoch = hist.get("epoch", list(range(1, len(accs) + 1)))[accs.index(max(accs))]
    return {"best_acc": best, "best_epoch": best_epoch, "epochs": len(accs)}

"""``info`` on the worker side: what a person wants to know about a checkpoint file."""

from __future__ import annotations

from typing import Any

from trainer.config.archs import get_arch
from trainer.files.checkpoint import (
    build_model,
    load_checkpoint,
    summarize_history,
    trained_input_size,
)
from trainer.models.build import family, new_model
from trainer.models.family import count_params
from trainer.prune.engine import units_of


def file_format(ckpt: dict[str, Any]) -> str:
    """What kind of file a loaded checkpoint came from, in words."""
    if ckpt.get("kind") == "resume":
        return "slimtune resume state"
    return "slimtune" if ckpt["format_version"] else "lab {cfg, state_dict}"


def describe(path: str, arch: str | None = None) -> dict[str, Any]:
    """Architecture, classes, params, per-stage widths, history and prune metadata (``arch``:
    that of a file naming none, as ``--arch``)."""
    ckpt = load_checkpoint(path, arch)
    model = build_model(ckpt)
    arch = ckpt["arch"]
    kept = _per_stage(arch, units_of(model))
    full = _per_stage(arch, units_of(new_model(arch, ckpt["num_classes"], None,
                                               trained_input_size(ckpt))))
    stages = [{"stage": stage, "kept": sum(sum(b) for b in blocks),
               "full": sum(sum(b) for b in full[stage]), "blocks": blocks}
              for stage, blocks in kept.items()]
    run_epochs = (ckpt.get("config") or {}).get("epochs")
    out = {"path": str(path), "format": file_format(ckpt), "arch": arch,
           "prunes": get_arch(arch).pruned, "num_classes": ckpt["num_classes"],
           "params": count_params(model), "pruned": any(s["kept"] != s["full"] for s in stages),
           "stages": stages, **summarize_history(ckpt),
           "run_epochs": run_epochs if isinstance(run_epochs, int) else None}
    if "prune" in ckpt:
        out["prune"] = ckpt["prune"]
    return out


def _per_stage(arch: str, units) -> dict[str, list[list[int]]]:
    """stage -> per block, the live channels of each prunable unit (e.g. [bn1, bn2])."""
    stages: dict[str, dict[str, list[int]]] = {}
    for unit in units:
        if unit.prunable:
            block = unit.name.rsplit(".", 1)[0] if "." in unit.name else unit.name
            stage = family(arch).stage(arch, unit.name)
            stages.setdefault(stage, {}).setdefault(block, []).append(len(unit.score))
    return {stage: list(blocks.values()) for stage, blocks in stages.items()}

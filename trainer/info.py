"""``info CKPT``: what a person wants to know about a .pth file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer


def describe(path: str) -> dict[str, Any]:
    """Architecture, classes, params, per-stage widths, history and prune metadata."""
    from trainer.archs import get_arch
    from trainer.checkpoint import build_model, load_checkpoint, summarize_history
    from trainer.models import count_params, new_model
    from trainer.prune import units_of

    ckpt = load_checkpoint(path)
    model = build_model(ckpt)
    arch = ckpt["arch"]
    kept = _per_stage(arch, units_of(model))
    full = _per_stage(arch, units_of(new_model(arch, ckpt["num_classes"])))
    stages = [{"stage": stage, "kept": sum(sum(b) for b in blocks),
               "full": sum(sum(b) for b in full[stage]), "blocks": blocks}
              for stage, blocks in kept.items()]
    out = {"path": str(path),
           "format": "slimtune" if ckpt["format_version"] else "lab {cfg, state_dict}",
           "arch": arch, "prunes": get_arch(arch).pruned, "num_classes": ckpt["num_classes"],
           "params": count_params(model), "pruned": any(s["kept"] != s["full"] for s in stages),
           "stages": stages, **summarize_history(ckpt)}
    if "prune" in ckpt:
        out["prune"] = ckpt["prune"]
    return out


def _per_stage(arch: str, units) -> dict[str, list[list[int]]]:
    """stage -> per block, the live channels of each prunable unit (e.g. [bn1, bn2])."""
    from trainer.models import family

    stages: dict[str, dict[str, list[int]]] = {}
    for unit in units:
        if unit.prunable:
            block = unit.name.rsplit(".", 1)[0] if "." in unit.name else unit.name
            stage = family(arch).stage(arch, unit.name)
            stages.setdefault(stage, {}).setdefault(block, []).append(len(unit.gamma))
    return {stage: list(blocks.values()) for stage, blocks in stages.items()}


def info(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint (.pth) to describe.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> int:
    """Describe a checkpoint: architecture, classes, params, cfg per stage, history, pruning."""
    d = describe(checkpoint)
    if json_out:
        print(json.dumps(d))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    console.print(f"[bold]{Path(checkpoint).name}[/]  {d['arch']}, {d['num_classes']} classes, "
                  f"{d['params']:,} params ({d['format']} checkpoint)")
    console.print(f"pruned: {d['prunes']}")
    table = Table(title="pruned channels per stage (kept / full)")
    for col in ("stage", "kept / full", "per block"):
        table.add_column(col)
    for s in d["stages"]:
        blocks = " ".join("[" + ",".join(map(str, b)) + "]" for b in s["blocks"])
        table.add_row(s["stage"], f"{s['kept']} / {s['full']}", blocks)
    console.print(table)
    if d["epochs"]:
        console.print(f"history: {d['epochs']} epochs, best test accuracy {d['best_acc']:.2f}% "
                      f"at epoch {d['best_epoch']}")
    else:
        console.print("history: none")
    if "prune" in d:
        p = d["prune"]
        console.print(f"pruned from {p.get('source')} at ratio {p.get('ratio')} "
                      f"(threshold {p.get('threshold', float('nan')):.4g})")
    return 0


def register(app: typer.Typer) -> None:
    """Add the ``info`` command to ``app``."""
    app.command("info")(info)

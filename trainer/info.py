"""``info CKPT``: what a person wants to know about a .pth file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer


def describe(path: str) -> dict[str, Any]:
    """Architecture, classes, params, per-stage widths, history and prune metadata."""
    from trainer.checkpoint import build_model, load_checkpoint, summarize_history
    from trainer.models import (
        STAGE_BLOCKS,
        bn_names,
        count_params,
        default_widths,
        effective_widths,
    )

    ckpt = load_checkpoint(path)
    widths, full, names = effective_widths(ckpt["cfg"]), default_widths(), bn_names()
    stages = []
    for stage in range(1, len(STAGE_BLOCKS) + 1):
        idx = [i for i, n in enumerate(names) if n.startswith(f"layer{stage}.")
               and n.endswith((".bn1", ".bn2"))]
        stages.append({"stage": f"layer{stage}", "kept": sum(widths[i] for i in idx),
                       "full": sum(full[i] for i in idx),
                       "blocks": [[widths[i], widths[i + 1]] for i in idx[::2]]})
    out = {"path": str(path),
           "format": "slimtune" if ckpt["format_version"] else "lab {cfg, state_dict}",
           "arch": ckpt["arch"], "num_classes": ckpt["num_classes"],
           "params": count_params(build_model(ckpt)), "pruned": widths != full, "stages": stages,
           **summarize_history(ckpt)}
    if "prune" in ckpt:
        out["prune"] = ckpt["prune"]
    return out


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
    table = Table(title="bn1/bn2 channels per stage (kept / full)")
    for col in ("stage", "kept / full", "per block [bn1, bn2]"):
        table.add_column(col)
    for s in d["stages"]:
        blocks = " ".join(f"[{a},{b}]" for a, b in s["blocks"])
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

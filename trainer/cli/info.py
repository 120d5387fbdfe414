"""The ``info`` command's options and output (the facts: ``trainer.commands.info``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from trainer.cli.archopt import ArchOption, names_user_model


def wide_console() -> Console:
    """A console for tables and long lines: the terminal's width, or 160 columns when the
    output is piped or captured (rich would assume 80 and wrap file names)."""
    console = Console(highlight=False, soft_wrap=True)
    return console if console.is_terminal else Console(highlight=False, soft_wrap=True,
                                                       width=160)


@names_user_model
def info(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint (.pth) to describe.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    arch: ArchOption = None,
) -> int:
    """Describe a checkpoint: architecture, classes, params, cfg per stage, history, pruning."""
    from trainer.commands.info import describe

    d = describe(checkpoint, arch)
    if json_out:
        print(json.dumps(d))
        return 0
    console = wide_console()
    console.print(f"[bold]{escape(Path(checkpoint).name)}[/]  {d['arch']}, "
                  f"{d['num_classes']} classes, {d['params']:,} params ({escape(_format(d))})")
    console.print(f"pruned: {d['prunes']}")
    what = "pruned channels per stage (kept / full)" if d["pruned"] else \
        "channels per stage (unpruned: kept = full)"
    table = Table(title=what)
    for col in ("stage", "kept / full", "per block"):
        table.add_column(col)
    for s in d["stages"]:
        blocks = " ".join("[" + ",".join(map(str, b)) + "]" for b in s["blocks"])
        table.add_row(s["stage"], f"{s['kept']} / {s['full']}", blocks)
    console.print(table)
    console.print(history_line(d))
    if "prune" in d:
        console.print(escape(prune_line(d["prune"])))
    return 0


def prune_line(p: dict[str, Any]) -> str:
    """'pruned from X at ratio 0.5 by bn, global (threshold 0.01); BN statistics re-estimated
    on 20 batches' (files of older versions: bn, global)."""
    criterion, allocation = p.get("criterion") or "bn", p.get("allocation") or "global"
    threshold = p.get("threshold")
    how = f"threshold {threshold:.4g}" if isinstance(threshold, (int, float)) else \
        "⌊ratio·C⌋ of every layer"
    source = p.get("source") or "a model in Python"
    line = (f"pruned from {source} at ratio {p.get('ratio')} by {criterion}, "
            f"{allocation} ({how})")
    batches = p.get("bn_recalibrate")
    if batches:
        line += f"; BN statistics re-estimated on {batches} training batches"
    return line


def _format(d: dict[str, Any]) -> str:
    if d["format"] == "slimtune resume state":
        return "slimtune resume state: the weights of its last finished epoch, not its best"
    return f"{d['format']} checkpoint"


def history_line(d: dict[str, Any]) -> str:
    """'history: 2 epochs run; the file holds epochs 1-1 (up to its best), best ...'."""
    if not d["epochs"]:
        return "history: none"
    held, run = d["epochs"], d.get("run_epochs")
    ran = f"{run} epoch{'s' if run != 1 else ''} run" if run else \
        f"{held} epoch{'s' if held != 1 else ''}"
    upto = f"; this file holds the first {held} (up to its best epoch)" \
        if run and held < run else ""
    return (f"history: {ran}{upto}, best test accuracy {d['best_acc']:.2f}% at epoch "
            f"{d['best_epoch']}")


def register(app: typer.Typer) -> None:
    """Add the ``info`` command to ``app``."""
    app.command("info")(info)

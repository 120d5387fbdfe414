"""Options every measuring command shares. Building them imports no torch."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from trainer.config.checks import check
from trainer.config.derived import option_help


def flag(name: str, help: str) -> Any:  # noqa: A002
    """An off-by-default ``--name`` switch with its help (the type of a command's parameter)."""
    return Annotated[bool, typer.Option(name, show_default=False, help=help)]


ThreadsOption = Annotated[int | None, typer.Option(
    "--threads", show_default=False, help=option_help("threads"))]


def use_threads(given: int | None) -> str:
    """Set this process's torch threads as a run does (trainer.config.threads); the choice in
    words, for the command's header."""
    from trainer.train.runtime import threads_for

    if given is not None:
        check("threads", given)
    return str(threads_for(given))

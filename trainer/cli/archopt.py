"""``--arch`` on the commands that read checkpoint files directly (info, profile): the
architecture of a file that names none, or the user model a file of the user's own code holds
(its code is imported only because the user typed the name: trainer.config.usercode)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated, Any

import typer

from trainer.config.archs import user_arch_name
from trainer.config.usercode import allowing

ArchOption = Annotated[str | None, typer.Option(
    "--arch", show_default=False,
    help="Architecture of a file that names none; for a file of your own model, its "
         "module.path:factory (slimtune imports your code only when you name it) (default: "
         "what the file names, else what its keys show).")]


def names_user_model(command: Callable[..., Any]) -> Callable[..., Any]:
    """``command`` run with the user model its ``arch`` argument names allowed."""
    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        with allowing(user_arch_name(kwargs.get("arch"))):
            return command(*args, **kwargs)

    return run

"""The command-line app, built once and used twice.

``launch`` builds the user-facing app with ``dispatch`` = the launcher (it may start
``accelerate launch``); ``python -m trainer`` builds it with the in-process worker. The run
commands and their options come from ``trainer.config.commands``. Building the app and ``--help``
import no torch: the commands import what they run when they run.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
import traceback
import typing
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import typer

from trainer.cli.bench import register as register_bench
from trainer.cli.export import register as register_export
from trainer.cli.info import register as register_info
from trainer.cli.measure import register as register_report
from trainer.config.commands import (
    COMMANDS,
    HELP_BY_COMMAND,
    Command,
    config_from_options,
    default_of,
)
from trainer.config.derived import option_help, option_type
from trainer.config.settings import RunConfig
from trainer.config.sweep import numeric
from trainer.errors import HardStop, ParamError, UserError
from trainer.files.atomic import disk_full
from trainer.train import dist

Dispatch = Callable[[RunConfig], int]


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(Exit, usage error, Abort) classes that parsing a command line may raise.

    typer >= 0.26 raises from its own copy of click (``typer._click``, with ``typer.Exit`` and
    ``typer.Abort``), older typer from ``click`` itself; each may be absent, so every one
    found is caught.
    """
    exits, usage, aborts = [typer.Exit], [], [typer.Abort]
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        usage.append(mod.ClickException)
        exits.append(getattr(mod, "Exit", typer.Exit))  # typer._click has neither
        aborts.append(getattr(mod, "Abort", typer.Abort))
    return tuple(exits), tuple(usage), tuple(aborts)


_EXIT, _USAGE, _ABORT = _click_exceptions()

def _option(name: str, default: Any, command: str = "") -> inspect.Parameter:
    typ = option_type(name)
    if command == "sweep" and numeric(name):  # a list of values (trainer.config.sweep)
        typ, default = str | None, None if default is None else f"{default:g}"
    if default is None and type(None) not in typing.get_args(typ):
        typ = typ | None  # the command leaves it to a recipe or a default file
    help_text = HELP_BY_COMMAND.get((command, name), option_help(name))
    flag = "--" + name.replace("_", "-")
    decl = [f"{flag}/--no-{flag[2:]}"] if typ is bool else [flag]
    ann = Annotated[typ, typer.Option(*decl, help=help_text, show_default=True)]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=ann)


def _argument(name: str, command: str) -> inspect.Parameter:
    help_text = HELP_BY_COMMAND.get((command, name), option_help(name))
    return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                             annotation=Annotated[str, typer.Argument(help=help_text)])


def _make_command(spec: Command, dispatch: Dispatch) -> Callable[..., int]:
    params = [_argument(p, spec.name) for p in spec.positional]
    params += [_option(f, default_of(spec, f), spec.name) for f in spec.fields]

    def command(**kwargs: Any) -> int:
        try:
            return dispatch(config_from_options(spec.command, kwargs))
        except HardStop as hard:  # here: typer >= 0.26 turns it into a silent exit 130
            return _hard_stop(hard)

    command.__signature__ = inspect.Signature(params)
    command.__doc__ = spec.doc
    command.__name__ = spec.name
    return command


def build_app(dispatch: Dispatch | None = None, name: str = "slimtune",
              more: Sequence[Callable[[typer.Typer], None]] = ()) -> typer.Typer:
    """The Typer app; ``dispatch`` runs a RunConfig (default: ``run_worker``, in this
    process); ``more`` register further commands (the launcher's ``config``)."""
    app = typer.Typer(name=name, add_completion=False, no_args_is_help=True,
                      pretty_exceptions_enable=False, rich_markup_mode=None,
                      help="slimtune: prune CNNs by network slimming, fine-tune, measure and "
                           "compare them, on CPU, one GPU or many.")
    for spec in COMMANDS:
        app.command(spec.name)(_make_command(spec, dispatch or _run_in_process))
    for register in (register_info, register_report, register_bench, register_export, *more):
        register(app)
    set_short_help(app)
    return app


def _run_in_process(run: RunConfig) -> int:
    from trainer.commands.worker import run_worker  # the worker side imports torch

    return run_worker(run)


def set_short_help(app: typer.Typer) -> None:
    """The command list of ``--help`` shows each command's whole first docstring line
    (Click would cut it at 45 characters)."""
    for info in app.registered_commands:
        doc = info.help or inspect.getdoc(info.callback) or ""
        if info.short_help is None and doc:
            info.short_help = doc.strip().splitlines()[0].rstrip(".")


def run_app(app: typer.Typer, argv: list[str] | None = None, prog: str = "slimtune") -> int:
    """Run ``app``; user errors become one ``error: ...`` line and exit code 2."""
    launched = bool(os.environ.get(dist.FAILURE_DIR_ENV))
    try:
        rv = app(args=argv, prog_name=prog, standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except _EXIT as exc:
        return exc.exit_code
    except _USAGE as exc:
        message, code = f"{exc.format_message()} (see --help)", exc.exit_code
    except (*_ABORT, KeyboardInterrupt) as exc:
        # click turns a KeyboardInterrupt into Abort; a second Ctrl-C (HardStop) says so
        hard = next((e for e in (exc, exc.__cause__) if isinstance(e, HardStop)), None)
        return 130 if hard is None else _hard_stop(hard)
    except UserError as exc:  # the library names parameters; the command line, flags
        message = exc.cli_message() if isinstance(exc, ParamError) else str(exc)
        message, code = from_loader_worker(message), exc.exit_code
    except Exception as exc:  # noqa: BLE001 -- a crash: keep the traceback, name the rank
        full = disk_full(exc)
        if full is not None:  # every write is atomic: the files already there are whole
            return _fail(f"the disk is full ({full.strerror}); free some space, then run again "
                         "(add --resume to continue a run from its last finished epoch)", 1,
                         launched)
        _report(f"{type(exc).__name__}: {exc}", 1)
        if launched and dist.is_peer_loss(str(exc)):
            return 1  # only another rank's failure: the launcher names that rank, last
        print(f"[rank {dist.rank()}] crashed:", file=sys.stderr)
        traceback.print_exc()
        return 1
    return _fail(message, code, launched)


def _hard_stop(hard: HardStop) -> int:
    """A second Ctrl-C: one line (the launcher's, in a job), exit code 130."""
    dist.report_to_launcher(str(hard), 130)
    if not os.environ.get(dist.FAILURE_DIR_ENV) and (dist.is_main() or dist.world_size() == 1):
        print(str(hard), file=sys.stderr)
    return 130


MAX_MESSAGE = 2000  # characters of an error line; each quoted value is bounded far below it


def from_loader_worker(message: str) -> str:
    """The original message of an error a DataLoader worker raised: torch re-raises it in the
    main process as 'Caught X in DataLoader worker process 0. Original Traceback ...' with the
    worker's whole traceback in the message."""
    if "\nOriginal Traceback" not in message:
        return message
    last = [ln for ln in message.strip().splitlines() if ln.strip()][-1]
    head, sep, rest = last.partition(": ")
    return rest if sep and " " not in head else last


def _fail(message: str, code: int, launched: bool) -> int:
    """One ``error:`` line (from the main process), and the report the launcher reads."""
    message = " ".join(message.split("\n"))
    if len(message) > MAX_MESSAGE:  # a last bound: no message may flood a terminal or a log
        message = f"{message[:MAX_MESSAGE]}... ({len(message):,} characters)"
    _report(message, code)
    if not launched and (dist.is_main() or dist.world_size() == 1):
        print(f"error: {message}", file=sys.stderr)
    return code


def _report(message: str, code: int) -> None:
    """The failure report the launcher reads, written whole: a stop signal meanwhile (the
    agent SIGTERMs a rank whose peer died) waits, or the launcher would have no rank to name."""
    loop = sys.modules.get("trainer.train.loop")  # loaded only where a run started
    with loop.STOP.in_loop() if loop else contextlib.nullcontext():
        dist.report_to_launcher(message, code)

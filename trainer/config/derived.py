"""What the declarations of trainer.config.settings give the rest: each setting's --help text
and command-line type, the lists of each kind (what --resume compares, what a checkpoint
leaves out, what only the launcher reads), the saved config, and the data settings a
checkpoint passes on to the commands that read it. Pure Python, like settings."""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any

from trainer.config.settings import RunConfig, arch_help


def _fields_of(kind: str) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(RunConfig) if f.metadata.get("kind") == kind)


def result_fields(command: str) -> tuple[str, ...]:
    """The result settings of a ``command`` run: what ``--resume`` compares (a pipeline's
    training stage is not remade for another prune ratio)."""
    return tuple(f.name for f in dataclasses.fields(RunConfig)
                 if f.metadata.get("kind") == "result"
                 and command in (f.metadata.get("affects") or (command,)))


# Settings left out of the saved config, so a resumed run's checkpoint equals an
# uninterrupted run's.
VOLATILE_FIELDS = _fields_of("volatile")
# Settings that only steer the launcher (how processes start), not what a worker computes.
LAUNCHER_FIELDS = frozenset(_fields_of("launcher"))


def option_help(name: str) -> str:
    """A setting's ``--help`` text."""
    if name == "arch":
        return arch_help()
    return RunConfig.__dataclass_fields__[name].metadata["help"]


def option_type(name: str) -> Any:
    """The type the command line reads for a setting (its field's type unless declared)."""
    declared = RunConfig.__dataclass_fields__[name].metadata["cli"]
    if declared is not None:
        return declared | None
    return _type_hints()[name]


@functools.cache
def _type_hints() -> dict[str, Any]:
    # resolving RunConfig's string annotations takes ~2 ms a call; the app makes ~270 calls
    return typing.get_type_hints(RunConfig)


def option_names() -> tuple[str, ...]:
    """Every setting a command line can set."""
    return tuple(f.name for f in dataclasses.fields(RunConfig) if f.metadata["option"])


# The data settings a command that reads a checkpoint takes from the checkpoint's saved
# settings when the command line leaves them out (None).
INHERITED = ("dataset", "data_dir", "image_size", "augment", "synthetic_train",
             "synthetic_test")


def with_data_defaults(run: RunConfig, saved: dict[str, Any] | None) -> tuple[RunConfig, list]:
    """``run`` with each INHERITED setting left at None taken from ``saved`` (a checkpoint's
    settings), else RunConfig's default; and the names taken from ``saved``."""
    saved = saved or {}
    values, taken = {}, []
    for name in INHERITED:
        if getattr(run, name) is not None:
            continue
        kind = type(getattr(RunConfig(), name))
        if isinstance(saved.get(name), kind) and not isinstance(saved.get(name), bool):
            values[name] = saved[name]
            taken.append(name)
        else:
            values[name] = getattr(RunConfig(), name)
    return run.replace(**values), taken


def saved_config(run: RunConfig) -> dict[str, Any]:
    """The settings a checkpoint records: everything that shapes its numbers."""
    return {k: v for k, v in run.to_dict().items() if k not in VOLATILE_FIELDS}


def worker_fields() -> list[dataclasses.Field]:
    """Fields passed on to a launched worker as ``--name value`` options."""
    return [f for f in dataclasses.fields(RunConfig)
            if f.name not in LAUNCHER_FIELDS and f.metadata["option"]]

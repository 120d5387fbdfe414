"""The user's own models by name: ``module.path:factory`` (a function or class that takes
``num_classes`` and returns an ``nn.Module``), and the rule that keeps a file from running code.

A name is checked here before anything is imported: dotted ASCII identifiers on both sides of
one colon, at most NAME_CHARS characters, no dunder attribute on the factory side, and no module
of Python's standard library (``os:system`` is refused, never imported). A name is *allowed*
(its module may be imported) only while the user has named it: ``--arch NAME`` on the command
line for the command's run, or a factory or model object given in Python (:func:`allowing`). A
checkpoint only ever *names* its model; a file naming a model nobody allowed is refused.

Pure Python (no torch): the launcher checks ``--arch`` with it.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from trainer.errors import ParamError, shown

NAME_CHARS = 200  # longer names are refused unread (a file may hold a 10,000-character one)
_PART = r"[A-Za-z_][A-Za-z0-9_]*"
_NAME = re.compile(rf"({_PART}(?:\.{_PART})*):({_PART}(?:\.{_PART})*)")
HOW = "module.path:factory"  # how the name is written, for messages
# name -> the factory object given in Python, or None: import it by name (the command line's)
_ALLOWED: ContextVar[dict[str, Callable[..., Any] | None]] = ContextVar("user_models",
                                                                        default={})


def looks_like_user_name(name: object) -> bool:
    """Whether ``name`` is meant as ``module:factory`` (a colon, no registry prefix)."""
    return isinstance(name, str) and ":" in name


def parse_user_name(name: str, param: str = "arch") -> tuple[str, str]:
    """(module, factory path) of a user model's name, or ParamError naming ``param``; nothing
    is imported."""
    if len(name) > NAME_CHARS:
        raise ParamError.value(param, name, f" is too long for a {HOW} name (at most "
                               f"{NAME_CHARS} characters)", quote=True)
    match = _NAME.fullmatch(name)
    if match is None:
        raise ParamError.value(param, name, f" is not a {HOW} name (dotted Python identifiers, "
                               "one colon, e.g. mynets:make_net)", quote=True)
    module, factory = match.groups()
    top = module.split(".")[0]
    if top in sys.stdlib_module_names and top != "__main__" or top == "builtins":
        raise ParamError.value(param, name, f" names Python's standard library ({top}), not a "
                               f"model factory; give the {HOW} of your model", quote=True)
    if any(p.startswith("__") and p.endswith("__") for p in factory.split(".")):
        raise ParamError.value(param, name, f" names a special attribute; give the {HOW} of a "
                               "function or class that takes num_classes", quote=True)
    return module, factory


def allowed(name: str) -> bool:
    """Whether the user named this model in this run (its code may be imported)."""
    return name in _ALLOWED.get()


def given_factory(name: str) -> Callable[..., Any] | None:
    """The factory object given in Python for ``name`` (None: import it by name)."""
    return _ALLOWED.get().get(name)


@contextmanager
def allowing(name: str | None, factory: Callable[..., Any] | None = None) -> Iterator[None]:
    """Within the block, the user model ``name`` may be built: by ``factory`` (an object the
    user gave) or by importing the name (the user typed it). ``name`` None: nothing changes.
    (Callers pass only user models' names: trainer.config.archs.user_arch_name.)"""
    if name is None:
        yield
        return
    parse_user_name(name)
    token = _ALLOWED.set({**_ALLOWED.get(), name: factory})
    try:
        yield
    finally:
        _ALLOWED.reset(token)


def refusal(path: object, name: str) -> str:
    """Why a file naming the user model ``name`` is not loaded, and how to load it."""
    module, factory = name.split(":", 1)
    head = (f"{path} holds a model of your own code ({shown(name)}); slimtune imports no code "
            "because a file names it")
    if module == "__main__":
        return (f"{head}: it was saved from a notebook or script, so load it in Python with "
                f"slimtune.load(path, factory={factory}), or define {factory} in a module and "
                "save it again")
    return (f"{head}: name it to load the file: --arch {name} on the command line, or "
            f"slimtune.load(path, factory={factory.rsplit('.', 1)[-1]}) in Python")

"""``python -m launch`` / ``slimtune``: the user-facing CLI.

The run commands are trainer's (``trainer.options``, built by ``trainer.cli``); here they get
the launcher as their dispatch, which runs in-process or starts ``accelerate launch -m
trainer``. Building the app imports no torch, so ``--help``, ``config`` and ``--dry-run``
start at once.
"""

from __future__ import annotations

import sys

from launch.configcmd import register as register_config
from launch.plan import dispatch
from trainer.cli import build_app, run_app, set_short_help


def make_app():
    app = build_app(dispatch)
    register_config(app)
    set_short_help(app)
    return app


def main() -> None:
    """Console-script entry point (``slimtune``)."""
    sys.exit(run_app(make_app(), prog="slimtune"))

"""``python -m launch`` / ``slimtune``: the user-facing CLI.

The run commands are trainer's (declared once in trainer.cli); here they get the launcher
as their dispatch, which runs in-process or starts ``accelerate launch -m trainer``.
"""

from __future__ import annotations

import sys

from trainer.cli import build_app, run_app, set_short_help


def make_app():
    from launch.configcmd import register as register_config
    from launch.launcher import dispatch

    app = build_app(dispatch)
    register_config(app)
    set_short_help(app)
    return app


def main() -> None:
    """Console-script entry point (``slimtune``)."""
    sys.exit(run_app(make_app(), prog="slimtune"))

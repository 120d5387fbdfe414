"""``python -m launch`` / ``slimtune``: the user-facing CLI.

The run commands are trainer's (``trainer.config.commands``, built by ``trainer.cli.app``);
here they get the launcher as their dispatch, which runs in-process or starts ``accelerate
launch -m trainer``. Building the app imports no torch, so ``--help``, ``config`` and ``--dry-run``
start at once.
"""

from __future__ import annotations

import sys

from launch.configcmd import register as register_config
from launch.plan import dispatch
from trainer.cli.app import build_app, run_app


def make_app():
    return build_app(dispatch, more=[register_config])


def main() -> None:
    """Console-script entry point (``slimtune``)."""
    sys.exit(run_app(make_app(), prog="slimtune"))

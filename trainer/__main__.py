"""Worker entry point: ``accelerate launch -m trainer <command> ...`` or
``torchrun -m trainer <command> ...`` (the same options as ``python -m launch``)."""

import sys

from trainer.cli import build_app, run_app

if __name__ == "__main__":
    sys.exit(run_app(build_app(), prog="python -m trainer"))

"""Worker entry point: ``accelerate launch -m trainer <command> ...`` or
``torchrun -m trainer <command> ...`` (the same options as ``python -m launch``)."""

import logging
import os
import sys

from trainer.cli.app import build_app, run_app


def leave(code: int) -> None:
    """Exit a worker with ``code``.

    A rank of a multi-process job (WORLD_SIZE > 1) skips interpreter finalisation: measured
    here, about one gloo rank in three aborted (SIGABRT, exit -6) in C++ static destructors
    after its work was done, and the launcher then reported a finished job as failed. The
    process group is freed with the process (see ``trainer.train.runtime.end_run``). Everything a
    run writes is closed by then; flush what is buffered.
    """
    if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    leave(run_app(build_app(), prog="python -m trainer"))

"""Worker entry point: ``accelerate launch -m trainer <command> ...`` or
``torchrun -m trainer <command> ...`` (the same options as ``python -m launch``)."""

import logging
import os
import signal
import sys


def end_with_agent() -> None:
    """A rank asks Linux for SIGTERM when the process that started it (torchrun's agent, inside
    ``accelerate launch``) dies: torchrun starts each rank in a session of its own, so a
    SIGKILLed agent left its ranks training, reparented, still writing the outputs. SIGTERM
    stops a rank at its next step, as a forwarded signal does. Nothing outside Linux, and
    nothing in a process no agent started."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    import ctypes

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the agent died before the request: as if it came after
        os.kill(os.getpid(), signal.SIGTERM)


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
    end_with_agent()  # before the imports: they take seconds
    from trainer.cli.app import build_app, run_app

    leave(run_app(build_app(), prog="python -m trainer"))

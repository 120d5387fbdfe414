"""Process-group facts and the rank-0 policy, in one place.

Only the main process prints, draws and writes files; every rank takes part in every
collective. ``is_main()`` works before and without an Accelerator (reads the env vars
that torchrun / accelerate launch set).
"""

from __future__ import annotations

import os
import sys

from trainer.errors import StopRequested
from trainer.files.atomic import atomic_write_text


def _group():
    """torch.distributed when a process group is up, else None. Without torch imported there
    can be no group: the launcher and ``--help`` read the rank without importing torch."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist
    return None


def _several():
    """torch.distributed when a group of more than one process is up, else None."""
    dist = _group()
    return dist if dist is not None and dist.get_world_size() > 1 else None


def rank() -> int:
    dist = _group()
    return dist.get_rank() if dist is not None else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    dist = _group()
    return dist.get_world_size() if dist is not None else int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """True on the one process that prints, draws plots and writes checkpoints."""
    return rank() == 0


def barrier() -> None:
    dist = _several()
    if dist is not None:
        dist.barrier()


def all_reduce_sum(t):
    """Sum tensor ``t`` over ranks (in place, returned); a no-op in one process."""
    dist = _several()
    if dist is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t):
    """Element-wise max of tensor ``t`` over ranks (in place, returned); a no-op in one
    process."""
    dist = _several()
    if dist is not None:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast(t, src: int = 0):
    """Rank ``src``'s tensor ``t`` on every rank (in place, returned); a no-op in one process."""
    dist = _several()
    if dist is not None:
        dist.broadcast(t, src=src)
    return t


# Messages of a rank whose collective failed because ANOTHER rank died (gloo / NCCL).
_PEER_LOSS = ("connection closed by peer", "connection reset by peer", "remote worker crash",
              "communicator was aborted", "broken pipe")


def is_peer_loss(message: str) -> bool:
    """True if ``message`` is a consequence of another rank's failure, not a cause."""
    lowered = message.lower()
    return any(p in lowered for p in _PEER_LOSS)


# How a rank of a launched job ended, for the launcher (launch.supervise.run_job).
FAILURE_DIR_ENV = "SLIMTUNE_FAILURE_DIR"


def is_stop(message: str) -> bool:
    """True if a rank's report says it stopped on a signal (SIGINT/SIGTERM)."""
    return message.startswith(StopRequested.PREFIX)


def is_consequence(message: str) -> bool:
    """True if a rank's report is not a root cause: it lost a peer, or it was stopped by a
    signal (the agent SIGTERMs every other rank when one dies)."""
    return is_peer_loss(message) or is_stop(message)


def report_to_launcher(message: str, code: int) -> None:
    """Write ``rank<R>.txt`` into ``$SLIMTUNE_FAILURE_DIR`` (nothing when it is unset): the
    message on one line, then ``exit_code=N``. The launcher prints these as its last lines
    and exits with the root cause's code (torchrun turns every worker exit code into 1)."""
    folder = os.environ.get(FAILURE_DIR_ENV)
    if folder:
        try:
            atomic_write_text(os.path.join(folder, f"rank{rank()}.txt"),
                              message.replace("\n", " ") + f"\nexit_code={code}\n")
        except OSError:
            pass

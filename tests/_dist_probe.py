"""Test helper started by ``accelerate launch``: records what one process of the job saw.

Usage: ``python -m tests._dist_probe <command> [args...] --out DIR``. Each process builds an
``Accelerator`` (as the real worker does), all-reduces ``rank + 1`` and writes
``DIR/rank<R>.json`` with its rank, world size, backend, distributed type, the sum and its argv.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    out = Path(argv[argv.index("--out") + 1])
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator

    acc = Accelerator()
    total = torch.tensor([acc.process_index + 1.0])
    if dist.is_initialized():
        dist.all_reduce(total)
    record = {
        "rank": acc.process_index,
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "num_processes": acc.num_processes,
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "distributed_type": str(acc.distributed_type.value),
        "device": str(acc.device),
        "sum": total.item(),
        "argv": argv,
        "use_cpu_env": os.environ.get("ACCELERATE_USE_CPU"),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{acc.process_index}.json").write_text(json.dumps(record))
    failure_dir = os.environ.get("SLIMTUNE_FAILURE_DIR")
    if "--fail" in argv and failure_dir and record["rank"] == 1:
        Path(failure_dir, "rank1.txt").write_text("bad thing happened\nexit_code=2\n")
        return 2
    return 0


if __name__ == "__main__":
    # Leave as the real worker does: destroying a gloo group deadlocked on torch 2.4, and
    # interpreter finalisation could abort a gloo rank (trainer.__main__.leave).
    from trainer.__main__ import leave

    leave(main(sys.argv[1:]))

"""``run_worker(cfg)``: one process of a run, from settings to exit code.

What ``python -m trainer <command>`` (under accelerate launch or torchrun) and the launcher's
in-process mode both call: check the settings, build the Accelerator, run the command, and
turn a stop request into the exit code 128 + signal with a line saying how to resume.
"""

from __future__ import annotations

from trainer import dist
from trainer.archs import with_recipe
from trainer.checks import check_tracker, validate
from trainer.commands import cmd_evaluate, cmd_finetune, cmd_prune, cmd_train
from trainer.config import RunConfig
from trainer.engine import STOP
from trainer.errors import StopRequested
from trainer.pipeline import run_pipeline
from trainer.progress import console, say
from trainer.runtime import end_run, make_accelerator

COMMANDS = {"train": cmd_train, "finetune": cmd_finetune, "evaluate": cmd_evaluate,
            "prune": cmd_prune, "pipeline": run_pipeline}


def run_worker(cfg: RunConfig) -> int:
    """Run ``cfg.command`` in this process (one rank of a job, or the whole job)."""
    cfg = with_recipe(cfg)
    validate(cfg)
    if cfg.log_with:
        check_tracker(cfg.log_with)
    accelerator = make_accelerator(cfg)
    cfg = cfg.replace(num_processes=accelerator.num_processes)
    if cfg.debug:
        say("resolved settings:", cfg.to_dict())
    STOP.install()
    try:
        COMMANDS[cfg.command](cfg, accelerator)
    except StopRequested as stop:
        dist.report_to_launcher(str(stop), stop.exit_code)
        if dist.is_main() and (stop.resumable or cfg.command == "pipeline"):
            console.print(f"{stop}; the last finished epoch is saved. Resume with the same "
                          "command plus --resume", style="yellow")
        elif dist.is_main():
            console.print(f"{stop}, before any epoch finished: nothing to resume; run the "
                          "same command again", style="yellow")
        return stop.exit_code
    finally:
        # A rank of a multi-process job keeps the stop handlers until it exits: when one rank
        # dies, the agent SIGTERMs the others, and the default handler killed a survivor
        # between its error and its report (the launcher then had no rank to name).
        if dist.world_size() == 1:
            STOP.restore()
        end_run(accelerator)
    return 0

"""``run_worker(run)``: one process of a run, from settings to exit code.

What ``python -m trainer <command>`` (under accelerate launch or torchrun) and the launcher's
in-process mode both call: check the settings, build the Accelerator, run the command, and
turn a stop request into the exit code 128 + signal with a line saying how to resume.
"""

from __future__ import annotations

from trainer.commands.evaluate import cmd_evaluate
from trainer.commands.pipeline import run_pipeline
from trainer.commands.prune import cmd_prune
from trainer.commands.train import cmd_finetune, cmd_train, inherit_data_settings
from trainer.config.archs import with_recipe
from trainer.config.checks import validate
from trainer.config.settings import RunConfig
from trainer.errors import StopRequested
from trainer.train import dist
from trainer.train.loop import STOP
from trainer.train.progress import console, say
from trainer.train.runtime import check_tracker, end_run, make_accelerator

COMMANDS = {"train": cmd_train, "finetune": cmd_finetune, "evaluate": cmd_evaluate,
            "prune": cmd_prune, "pipeline": run_pipeline}


def run_worker(run: RunConfig) -> int:
    """Run ``run.command`` in this process (one rank of a job, or the whole job)."""
    run = inherit_data_settings(with_recipe(run))
    validate(run)
    if run.log_with:
        check_tracker(run.log_with)
    accelerator = make_accelerator(run)
    run = run.replace(num_processes=accelerator.num_processes)
    if run.debug:
        say("resolved settings:", run.to_dict())
    STOP.install()
    try:
        COMMANDS[run.command](run, accelerator)
    except StopRequested as stop:
        dist.report_to_launcher(str(stop), stop.exit_code)
        if dist.is_main() and (stop.resumable or run.command == "pipeline"):
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

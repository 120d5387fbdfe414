"""``run_worker(run)``: one process of a run, from settings to exit code.

What ``python -m trainer <command>`` (under accelerate launch or torchrun) and the launcher's
in-process mode both call: check the settings, build the Accelerator, run the command, and
turn a stop request into the exit code 128 + signal with a line saying how to resume.
"""

from __future__ import annotations

from trainer.commands.evaluate import cmd_evaluate
from trainer.commands.pipeline import check_study_outputs, run_pipeline
from trainer.commands.prune import cmd_prune
from trainer.commands.train import cmd_finetune, cmd_train, inherit_data_settings
from trainer.config.archs import user_arch_name, with_recipe
from trainer.config.checks import validate
from trainer.config.paths import lock_file, output_path, run_paths
from trainer.config.settings import RunConfig
from trainer.config.usercode import allowing
from trainer.errors import ConfigError, StopRequested
from trainer.files.atomic import remove_empty_made
from trainer.files.lock import OutputLock, roles_here
from trainer.train import dist
from trainer.train.fit import keep_earlier_run
from trainer.train.loop import STOP
from trainer.train.progress import console, say
from trainer.train.runtime import check_tracker, end_run, make_accelerator, threads_for

COMMANDS = {"train": cmd_train, "finetune": cmd_finetune, "evaluate": cmd_evaluate,
            "prune": cmd_prune, "pipeline": run_pipeline}


def run_worker(run: RunConfig) -> int:
    """Run ``run.command`` in this process (one rank of a job, or the whole job); a user
    model named by --arch may be imported while it runs (trainer.config.usercode)."""
    with allowing(user_arch_name(run.arch)):
        return _run_worker(run)


def _run_worker(run: RunConfig) -> int:
    STOP.install()  # first: a signal while the data is read or the model built stops at once
    lock = accelerator = None
    try:
        run = inherit_data_settings(with_recipe(run))
        validate(run)
        threads = threads_for(run.threads)
        if run.log_with:
            check_tracker(run.log_with)
        lock = take_output_lock(run)
        check_outputs(run)
        accelerator = make_accelerator(run)
        run = run.replace(num_processes=accelerator.num_processes)
        say(header(run, accelerator.device.type, threads))
        if run.debug:
            say("resolved settings:", run.to_dict())
        COMMANDS[run.command](run, accelerator)
    except StopRequested as stop:
        dist.report_to_launcher(str(stop), stop.exit_code)
        if dist.is_main() and (stop.resumable or _has_resume_state(run)):
            console.print(f"{stop}; the last finished epoch is saved. Resume with the same "
                          "command plus --resume", style="yellow")
        elif dist.is_main():
            when = "no epoch was trained" if stop.epoch is None else "before any epoch finished"
            console.print(f"{stop}, {when}: nothing to resume; run the same command again",
                          style="yellow")
        return stop.exit_code
    finally:
        # A rank of a multi-process job keeps the stop handlers until it exits: when one rank
        # dies, the agent SIGTERMs the others, and the default handler killed a survivor
        # between its error and its report (the launcher then had no rank to name).
        if dist.world_size() == 1:
            STOP.restore()
        if accelerator is not None:
            end_run(accelerator)
        if lock is not None:
            lock.release()
        remove_empty_made()  # a run that failed leaves no empty folder of its making
    return 0


def header(run: RunConfig, device: str, threads) -> str:
    """The run's first line: what runs where, with how many processes and threads."""
    procs = run.num_processes
    return (f"{run.command} on {device}: {procs} process{'es' if procs != 1 else ''}, "
            f"{threads}")


def take_output_lock(run: RunConfig) -> OutputLock | None:
    """This process's share of the lock on the run's outputs (trainer.files.lock): both roles
    in one process, the writer's in rank 0 of a job, none in the other ranks."""
    found = lock_file(run)
    if found is None or not dist.is_main():
        return None
    return OutputLock(found[1], found[0]).acquire(roles_here(dist.world_size()))


def check_outputs(run: RunConfig) -> None:
    """A new run (no --resume) never replaces an earlier run's results without --overwrite: a
    trained or pruned checkpoint, a resume state, a study's checkpoints. Made under the lock,
    before any work (the launcher also makes it before a job starts)."""
    if run.command in ("train", "finetune"):
        keep_earlier_run(output_path(run), run)
    elif run.command == "prune" and not run.overwrite:
        out = output_path(run)
        if out.exists():
            raise ConfigError(f"--output {out} already exists; give another --output to keep "
                              "both, or add --overwrite to replace it")
    elif run.command == "pipeline":
        check_study_outputs(run)


def _has_resume_state(run: RunConfig) -> bool:
    """Whether a run stopped before its loop still has an earlier resume state to go on from."""
    if run.command == "pipeline":
        return True
    out = output_path(run) if run.command in ("train", "finetune") else None
    return out is not None and run_paths(out)["last"].exists()

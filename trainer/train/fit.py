"""``fit``: epochs of train + evaluate with best checkpoint, resume state, metrics CSV,
curves; and the resume rules. All file writes happen on the main process; every rank runs
every collective."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.config.derived import result_fields, saved_config
from trainer.config.paths import run_paths
from trainer.config.settings import RunConfig
from trainer.data.gpu_loader import derive_seed
from trainer.errors import CheckpointError, ConfigError, StopRequested, TrainingError, cut
from trainer.files.atomic import atomic_path
from trainer.files.checkpoint import (
    HISTORY_KEYS,
    atomic_torch_save,
    make_checkpoint,
    save_checkpoint,
)
from trainer.files.safeload import safe_torch_load
from trainer.models.family import unwrap_model
from trainer.train import dist
from trainer.train.loop import STOP, eval_view, evaluate, lr_at, sync_buffers, train_one_epoch
from trainer.train.progress import EpochProgress, say


def empty_history() -> dict[str, list]:
    return {k: [] for k in HISTORY_KEYS}


def write_csv(path: Path, history: dict[str, list], append_last: bool) -> None:
    """Append the newest epoch (flushed, for ``tail -f``), or rewrite from ``history``."""
    rows = zip(*(history[k] for k in HISTORY_KEYS))
    if append_last and path.exists():
        with path.open("a", newline="") as fh:
            csv.writer(fh).writerow([history[k][-1] for k in HISTORY_KEYS])
            fh.flush()
        return
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(HISTORY_KEYS)
        writer.writerows(rows)


@dataclass
class FitState:
    next_epoch: int = 0
    best_acc: float = -math.inf
    best_epoch: int | None = None
    history: dict[str, list] = field(default_factory=empty_history)
    csv_written: bool = False  # by this process: its first epoch rewrites the CSV whole


PATH_FIELDS = ("data_dir", "checkpoint", "init")
RESUME_KEYS = ("model", "optimizer", "epoch", "best_acc", "best_epoch", "history")


def resume_mismatch(saved: dict[str, Any], run: RunConfig) -> list[str]:
    """Result-changing settings that differ between a resume state and this run."""
    now = run.to_dict()
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in result_fields(run.command)
            if k in saved and not _same_setting(k, saved.get(k), now.get(k))]


def _same_setting(key: str, a: Any, b: Any) -> bool:
    """Paths compare resolved: './data', 'data' and its absolute path are one folder."""
    if key in PATH_FIELDS and isinstance(a, str) and isinstance(b, str):
        return Path(a).resolve() == Path(b).resolve()
    if key == "loader" and "auto" in (a, b):  # files saved before the loader was resolved
        return True
    return a == b


def load_resume(path: Path, run: RunConfig, model: nn.Module, optimizer,
                scaler=None) -> FitState:
    """Restore model, optimizer, fp16 loss scaler, history and best-so-far from a
    ``.last.pth`` state."""
    if not path.exists():
        raise ConfigError(f"--resume: no resume state at {path}; run without --resume to start")
    state = safe_torch_load(path, what="resume state")
    missing = [k for k in RESUME_KEYS if k not in state]
    if missing:
        raise ConfigError(f"--resume: {path} is not a resume state (no {', '.join(missing)}); "
                          "runs write it as <output stem>.last.pth; run without --resume")
    saved = state.get("config", {})
    diffs = resume_mismatch(saved, run)
    if diffs and not run.force_resume:
        raise ConfigError(f"--resume refused, settings differ from the interrupted run "
                          f"({'; '.join(diffs)}); rerun with the same settings or --force-resume")
    _restore(path, state, saved, run, model, optimizer)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])  # the loss scale the interrupted run had reached
    return FitState(next_epoch=int(state["epoch"]), best_acc=float(state["best_acc"]),
                    best_epoch=state["best_epoch"], history=state["history"])


def _restore(path: Path, state: dict, saved: dict, run: RunConfig, model: nn.Module,
             optimizer) -> None:
    """Weights and optimizer state; what --force-resume cannot bridge is one line, not a crash."""
    if saved.get("optimizer", run.optimizer) != run.optimizer:  # SGD state has no Adam moments
        raise ConfigError(f"--resume: {path} was written with --optimizer {saved['optimizer']}; "
                          "its optimizer state cannot continue another optimizer, even with "
                          f"--force-resume; use --optimizer {saved['optimizer']} or start afresh")
    try:
        unwrap_model(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:160]
        raise ConfigError(f"--resume: the weights in {path} do not fit this model ({first}); "
                          "resume with the run's own --checkpoint/--init or start without "
                          "--resume") from None


def keep_interrupted_run(last: Path, run: RunConfig) -> None:
    """Refuse a fresh start that would discard an interrupted run that ``--resume`` could
    continue (a forgotten --resume must not cost the epochs trained). Other settings, or a
    file that is no resume state, are :func:`keep_earlier_run`'s to refuse."""
    if run.overwrite or not last.exists():
        return
    state = _resume_state(last)
    if state is None or state.get("finished") is not False:
        return
    if resume_mismatch(state.get("config") or {}, run):
        return
    done, total = state.get("epoch"), (state.get("config") or {}).get("epochs")
    raise ConfigError(f"{last} holds an interrupted run ({done} of {total} epochs done); "
                      f"add --resume to continue it, or --overwrite to start over")


def keep_earlier_run(output: Path, run: RunConfig) -> None:
    """Refuse a new run (no --resume) whose outputs hold an earlier run's results: its best
    checkpoint or its resume state would be replaced without a word. --overwrite allows it."""
    if run.resume or run.overwrite:
        return
    paths = run_paths(output)
    keep_interrupted_run(paths["last"], run)
    if not (paths["best"].exists() or paths["last"].exists()):
        return
    raise ConfigError(f"{output} {_what_is_there(paths, run)}; add --resume to continue it, "
                      "give another --output to keep both, or add --overwrite to replace it")


def _what_is_there(paths: dict[str, Path], run: RunConfig) -> str:
    """'holds a finished run (3 of 3 epochs, best 20.31% at epoch 2)' and the like."""
    state = _resume_state(paths["last"]) if paths["last"].exists() else None
    if state is not None:
        total = (state.get("config") or {}).get("epochs")
        best = _best_text(state.get("best_acc"), state.get("best_epoch"))
        best = f", {best}" if best else ""
        if state.get("finished"):
            return f"holds a finished run ({state.get('epoch')} of {total} epochs{best})"
        diffs = "; ".join(resume_mismatch(state.get("config") or {}, run))
        return (f"holds an interrupted run with other settings ({state.get('epoch')} of "
                f"{total} epochs done{best}; {cut(diffs)})")
    if paths["best"].exists():
        try:
            ckpt = safe_torch_load(paths["best"])
        except CheckpointError:
            return "already exists (a file that is not a checkpoint slimtune reads)"
        best = _best_text(ckpt.get("best_acc"), ckpt.get("best_epoch")) \
            if isinstance(ckpt, dict) else ""
        return f"holds a trained checkpoint ({best})" if best else "holds a checkpoint"
    return f"holds the resume state {paths['last'].name} of an earlier run"


def _best_text(acc: Any, epoch: Any) -> str:
    """'best 20.31% at epoch 2' (or '' when the file records no accuracy)."""
    if isinstance(acc, torch.Tensor) and acc.numel() == 1:
        acc = acc.item()
    if not isinstance(acc, (int, float)) or isinstance(acc, bool) or not math.isfinite(acc):
        return ""
    at = f" at epoch {epoch}" if isinstance(epoch, int) and not isinstance(epoch, bool) else ""
    return f"best {acc:.2f}%{at}"


def _resume_state(last: Path) -> dict | None:
    """The resume state at ``last``, or None when the file is not one."""
    try:
        state = safe_torch_load(last, what="resume state")
    except CheckpointError:
        return None
    return state if isinstance(state, dict) and "epoch" in state else None


def _clean_stale_temps(paths: dict[str, Path]) -> None:
    """Temp files of this run's writes that a SIGKILL interrupted (the real files are intact).

    Only this run's own names: another job writing into the same folder keeps its temp files.
    """
    for key in ("best", "last", "csv"):
        for tmp in paths[key].parent.glob(f".{paths[key].name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def fit(model: nn.Module, optimizer, *, accelerator, run: RunConfig, train_loader, test_loader,
        output: Path, extra: dict[str, Any], title: str,
        teacher: nn.Module | None = None) -> FitState:
    """Train for ``run.epochs``; keep the best checkpoint (by test accuracy) at ``output``.
    ``teacher``: distil from it (trainer.train.loop.kd_loss)."""
    paths = run_paths(output)
    main = dist.is_main()
    if run.resume:
        state = load_resume(paths["last"], run, model, optimizer,
                            getattr(accelerator, "scaler", None))
    else:
        keep_interrupted_run(paths["last"], run)
        state = FitState()
    if main:
        # Nothing is written here: the CSV is (re)written whole when the first epoch ends, so
        # a run that fails before that leaves every file as it was.
        output.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale_temps(paths)
        if run.resume and state.next_epoch >= run.epochs:
            best = _best_text(state.best_acc, state.best_epoch)
            say(f"{output.name} is finished: all {run.epochs} epochs were trained"
                f"{f' ({best})' if best else ''}; nothing to resume (to train longer: "
                "--resume --force-resume --epochs N)")
        elif run.resume:
            say(f"resuming {output.name} at epoch {state.next_epoch + 1}/{run.epochs}")
    steps = len(train_loader)
    bar = EpochProgress(title, run.epochs, steps, accelerator.num_processes, state.next_epoch)
    first = epoch = state.next_epoch
    try:
        with STOP.in_loop():
            for epoch in range(first, run.epochs):
                _run_epoch(model, optimizer, epoch, state, bar, accelerator=accelerator,
                           run=run, train_loader=train_loader, test_loader=test_loader,
                           paths=paths, extra=extra, compiling=run.compile and epoch == first,
                           teacher=teacher)
    except StopRequested as stop:
        stop.resumable = paths["last"].exists()
        raise
    except Exception as exc:
        if STOP.signum is None or dist.is_peer_loss(str(exc)):
            raise  # a lost peer stays a failure: the launcher names the rank that died
        # A signal sent to the whole process group (a scheduler's SIGTERM, `timeout`) also
        # ends the DataLoader workers before this rank's next check: the error that follows
        # is the stop's doing, so it stops like one.
        stop = StopRequested(STOP.signum, epoch + 1)
        stop.resumable = paths["last"].exists()
        raise stop from exc
    finally:
        bar.close()
    # The next stage of a pipeline reads what the main process just wrote, on every rank.
    dist.barrier()
    return state


def _run_epoch(model, optimizer, epoch: int, state: FitState, bar: EpochProgress, *,
               accelerator, run: RunConfig, train_loader, test_loader, paths, extra,
               compiling: bool = False, teacher: nn.Module | None = None) -> None:
    # Data order and augmentation are pure functions of (seed, epoch, rank) (trainer.data.datasets);
    # reseeding the global RNG per epoch makes anything else that draws from it (dropout, a
    # random transform) one too. A run resumed at an epoch boundary therefore draws the same
    # numbers as an uninterrupted one without saving any RNG state.
    torch.manual_seed(derive_seed(run.seed, epoch, dist.rank(), 1))
    train_loader.set_epoch(epoch)
    bar.start_epoch(epoch)
    tm = train_one_epoch(model, train_loader, optimizer, accelerator=accelerator, run=run,
                         epoch=epoch, on_step=bar.step, teacher=teacher)
    rate = bar.images_per_s()
    compile_s = None
    if compiling:  # this process's first epoch compiles in its first step: report apart
        compile_s, rate = bar.split_first_step()
    sync_buffers(model)
    em = evaluate(eval_view(model), test_loader, accelerator)
    if not math.isfinite(em["loss"]):  # the same on every rank: all of them stop here
        raise TrainingError(
            f"the test loss became non-finite after epoch {epoch + 1} (the weights diverged in "
            "its last steps); lower --lr or add --warmup-epochs (the best checkpoint already "
            "written is intact)")
    steps = len(train_loader)
    row = {"epoch": epoch + 1, "lr": lr_at(run, epoch, steps - 1, steps),
           "train_loss": tm["train_loss"], "train_acc": tm["train_acc"],
           "test_loss": em["loss"], "test_acc": em["accuracy"]}
    for key, value in row.items():
        state.history[key].append(value)
    improved = em["accuracy"] > state.best_acc
    if improved:
        state.best_acc, state.best_epoch = em["accuracy"], epoch + 1
    state.next_epoch = epoch + 1
    if dist.is_main():
        _save_epoch(model, optimizer, state, improved, accelerator=accelerator, run=run,
                    paths=paths, extra=extra)
        mark = " *best*" if improved else ""
        if compile_s is not None:
            say(f"torch.compile: {compile_s:.1f} s in the first step of epoch {epoch + 1} "
                "(left out of its img/s)")
        bar.end_epoch(
            f"epoch {epoch + 1}/{run.epochs}  lr {row['lr']:.2e}  "
            f"train loss {tm['train_loss']:.4f} acc {tm['train_acc']:.2f}%  "
            f"test loss {em['loss']:.4f} acc {em['accuracy']:.2f}%  "
            f"{rate:,.0f} img/s{mark}")
    if run.log_with:
        logged = {k: v for k, v in row.items() if k != "epoch"}
        if compile_s is not None:
            logged["compile_s"] = compile_s
        accelerator.log(logged, step=epoch + 1)


def _save_epoch(model, optimizer, state: FitState, improved: bool, *, accelerator,
                run: RunConfig, paths: dict[str, Path], extra: dict[str, Any]) -> None:
    """The best checkpoint (when the epoch beat it), the resume state and the CSV row."""
    config = saved_config(run)
    if improved:
        save_checkpoint(paths["best"], make_checkpoint(
            model, history=_copy(state.history), best_acc=state.best_acc,
            best_epoch=state.best_epoch, config=config, **extra))
    weights = make_checkpoint(model)
    atomic_torch_save({
        "kind": "resume", "model": weights["state_dict"], "arch": weights["arch"],
        "cfg": weights["cfg"], "optimizer": optimizer.state_dict(), "epoch": state.next_epoch,
        "scaler": _scaler_state(accelerator), "best_acc": state.best_acc,
        "best_epoch": state.best_epoch, "history": _copy(state.history), "config": config,
        "finished": state.next_epoch >= run.epochs}, paths["last"])
    write_csv(paths["csv"], state.history, append_last=state.csv_written)
    state.csv_written = True


def _scaler_state(accelerator) -> dict | None:
    """fp16's GradScaler state (its loss scale and growth tracker), so that a resumed run
    scales, and skips steps, as the uninterrupted one would."""
    scaler = getattr(accelerator, "scaler", None)
    return None if scaler is None else scaler.state_dict()


def _copy(history: dict[str, list]) -> dict[str, list]:
    return {k: list(v) for k, v in history.items()}


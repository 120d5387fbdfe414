"""The whole study in one command: sparse training -> prune at each ratio -> fine-tune
each -> compare, with every output under ``<workdir>/checkpoints`` and ``<workdir>/plots``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainer.commands.prune import cmd_prune
from trainer.commands.summary import finish_study, print_rows
from trainer.commands.train import cmd_finetune, cmd_train, scratch_plan
from trainer.config.paths import (
    CHECKPOINTS,
    PLOTS,
    SPARSE,
    run_paths,
    scratch_name,
    stage_files,
)
from trainer.config.settings import FINETUNE_RECIPE, TRAIN_RECIPE, RunConfig
from trainer.config.study import REPORT_JOB, SPARSE_JOB, chains
from trainer.errors import ConfigError
from trainer.files.atomic import ensure_writable
from trainer.files.checkpoint import build_model, load_checkpoint
from trainer.files.safeload import safe_torch_load
from trainer.measure.report import (
    StudyRow,
)
from trainer.prune.engine import copy_to_meta, model_size
from trainer.prune.record import PruneRecord
from trainer.train import dist
from trainer.train.fit import keep_interrupted_run, resume_mismatch
from trainer.train.progress import heading
from trainer.train.runtime import loader_kind


@dataclass
class Stage:
    """One step of a chain: its kind ('prune', 'finetune'), round, settings (what it runs and
    what --resume compares) and the file it makes."""

    kind: str
    round: int
    run: RunConfig
    output: Path

    @property
    def inputs(self) -> list[Path]:
        """The files it reads (a checkpoint, a teacher), which other stages may make."""
        run = self.run
        return [Path(p) for p in (run.checkpoint, run.teacher, run.init,
                                  getattr(run, "scratch_from", None)) if p]


@dataclass
class Chain:
    """One target of the study (a ratio or a budget) by one criterion and allocation, and its
    stages in order: a job of its own after the sparse stage (``pipeline --job <tag>``), whose
    files no other chain reads or writes. A stage added to ``stages`` runs in its turn (its
    runner: STAGE_RUNNERS)."""

    tag: str  # in file names and job names: '90' (ratio 0.9), '4M' (a params budget), 'l1_90'
    label: str  # in tables: 'ratio 0.9', '4M params'
    stages: list[Stage]
    criterion: str = "bn"
    allocation: str = "global"

    def stage(self, kind: str, number: int) -> Stage | None:
        return next((s for s in self.stages if s.kind == kind and s.round == number), None)


@dataclass
class Stages:
    sparse: Path
    train: RunConfig
    chains: list[Chain]

    def trained(self, job: str | None = None) -> list[tuple[Path, RunConfig]]:
        """(output, settings) of each training stage of ``job`` (None: the whole study)."""
        out = [(self.sparse, self.train)] if job in (None, SPARSE_JOB) else []
        return out + [(s.output, s.run) for c in self.chains if job in (None, c.tag)
                      for s in c.stages if s.kind != "prune"]

    def made(self, job: str | None = None) -> list[Path]:
        """Every checkpoint ``job`` (None: the whole study) makes."""
        out = [self.sparse] if job in (None, SPARSE_JOB) else []
        return out + [s.output for c in self.chains if job in (None, c.tag) for s in c.stages]


def plan_stages(run: RunConfig, unpruned: dict[str, int] | None = None) -> Stages:
    """The study's stages: the train recipe with the pipeline's epochs, lr, batch, warm-up and
    λ; then per ratio (or budget of ``run.targets``) a chain of ``run.passes`` rounds of a
    prune and the fine-tune recipe with the pipeline's epochs, lr, batch. ``unpruned``: the
    sparse model's params and MACs, which place the budgets of the rounds before the last."""
    sparse = Path(run.workdir) / CHECKPOINTS / SPARSE
    study, run = run, run.replace(scratch=None)  # --scratch is the chains' last stage's own
    train = run.replace(command="train", optimizer=TRAIN_RECIPE["optimizer"],
                        weight_decay=TRAIN_RECIPE["weight_decay"], epochs=run.train_epochs,
                        lr=run.train_lr, output=str(sparse), plot=None, checkpoint=None,
                        init=None)
    planned, targets = [], list(_amounts(run, unpruned or {}))
    for spec in chains(run):
        stages, src, tag = [], sparse, spec.tag
        for p, amount in enumerate(targets[spec.target], start=1):
            pruned, tuned = stage_files(run.workdir, tag, p, run.passes)
            prune = run.replace(command="prune", checkpoint=str(src), output=str(pruned),
                                plot=None, criterion=spec.criterion, allocation=spec.allocation,
                                **{"ratio": None, "target_params": None, "target_macs": None,
                                   **amount})
            # a round before the last fine-tunes with λ, so that the next one's |γ| separate
            ft = run.replace(command="finetune", **FINETUNE_RECIPE).replace(
                checkpoint=str(pruned), output=str(tuned), epochs=run.finetune_epochs,
                lr=run.finetune_lr, batch_size=run.finetune_batch_size, plot=None,
                sparsity=run.sparsity if p < run.passes else 0.0,
                teacher=str(sparse) if run.kd else None)
            stages += [Stage("prune", p, prune, pruned), Stage("finetune", p, ft, tuned)]
            src = tuned
        if study.scratch:
            stages.append(scratchheading(train, stages[-2], study.scratch))
        planned.append(Chain(tag, spec.label, stages, spec.criterion, spec.allocation))
    return Stages(sparse, train, planned)


def scratchheading(train: RunConfig, pruned: Stage, kind: str) -> Stage:
    """The last pruned architecture trained from scratch (``train --scratch-from``): the sparse
    stage's recipe without sparsity, Scratch-E's or Scratch-B's epochs (Liu et al. 2019)."""
    output = scratch_name(pruned.output, kind)
    scratch = train.replace(scratch_from=str(pruned.output), scratch=kind, sparsity=0.0,
                            output=str(output))
    return Stage("scratch", pruned.round, scratch, output)


def _amounts(run: RunConfig, unpruned: dict[str, int]):
    """Per round {ratio} or {target_*}, for every ratio or budget (in the order of
    trainer.config.study.chains). K rounds reach ratio r by removing 1 - (1 - r)^(1/K) of
    what is left each time, and a budget b by the budgets B·(b/B)^(p/K) (B: the unpruned
    size), so each round removes a like share."""
    k = run.passes
    if not run.targets:
        for r in run.ratios:
            step = 1 - (1 - r) ** (1 / k)
            yield [{"ratio": r if k == 1 else step}] * k
        return
    kind = run.target_kind
    for b in run.targets:
        full = unpruned.get(kind, b)
        yield [{f"target_{kind}": b if p == k else int(full * (b / full) ** (p / k))}
               for p in range(1, k + 1)]


def stage_action(run: RunConfig, stage_run: RunConfig, output: Path, upstream_ran: bool) -> str:
    """'skip', 'resume' or 'fresh' for a train/fine-tune stage under ``pipeline [--resume]``.

    A finished stage is skipped only if it ran with the settings asked now; forced on, it
    trains on for more epochs, else afresh. A stage whose input was just remade starts afresh;
    an unfinished one resumes (fit checks its settings).
    """
    last = run_paths(output)["last"]
    if not run.resume or upstream_ran or not last.exists():
        return "fresh"
    state = safe_torch_load(last, what="resume state")
    if not (state.get("finished") and output.exists()):
        return "resume"
    diffs = _changed(run, output, resume_mismatch(state.get("config", {}), stage_run))
    if not diffs:
        return "skip"
    return "resume" if all(d.startswith("epochs:") for d in diffs) else "fresh"


def reusable_prune(run: RunConfig, prune_run: RunConfig, pruned: Path,
                   upstream_ran: bool) -> PruneRecord | None:
    """The prune record of an earlier ``pipeline`` run's file, if it may be reused."""
    if not run.resume or upstream_ran or not pruned.exists():
        return None
    ckpt = load_checkpoint(pruned)
    changed = _changed(run, pruned, resume_mismatch(ckpt.get("config", {}), prune_run))
    # forced: pruned again with these settings
    return None if changed else PruneRecord.from_dict(ckpt.get("prune"))


def _changed(run: RunConfig, output: Path, diffs: list[str]) -> list[str]:
    """``diffs``, refused unless --force-resume: --resume must not pass off files made with
    other settings as this study's."""
    if diffs and not run.force_resume:
        raise ConfigError(f"pipeline --resume refused: {output.name} was made with other "
                          f"settings ({'; '.join(diffs)}); rerun with the same settings, add "
                          "--force-resume or use a new --workdir")
    return diffs


def _drop_stale_state(output: Path) -> None:
    """The resume state of a stage whose input was just remade continues nothing."""
    if dist.is_main():
        run_paths(output)["last"].unlink(missing_ok=True)
    dist.barrier()  # no rank looks for it before it is gone


def check_study_outputs(run: RunConfig) -> None:
    """A new study (no --resume, no --overwrite) never replaces an earlier one's results: for
    the whole study, or the files of ``--job`` only (the other jobs of a study made the rest)."""
    if run.resume or run.overwrite or run.job == REPORT_JOB:
        return
    stages = plan_stages(run)
    for output, stage_run in stages.trained(run.job):
        keep_interrupted_run(run_paths(output)["last"], stage_run)
    found = [p.name for p in stages.made(run.job) if p.exists()]
    if found:
        listed = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3
                                         else "")
        raise ConfigError(f"--workdir {run.workdir} holds an earlier study ({listed}); add "
                          "--resume to reuse its finished stages, give another --workdir "
                          "to keep both, or add --overwrite to redo it")


def run_pipeline(run: RunConfig, accelerator) -> list[StudyRow]:
    """Train with sparsity, prune to each ratio or budget (in ``run.passes`` rounds), fine-tune
    each, compare; returns one row per round. ``run.job``: only that job of the study (the
    sparse stage, one target's chain, or the report from the chains' files)."""
    # resolved now, as every stage saves it: --resume compares stages with these settings
    run = run.replace(loader=loader_kind(run, accelerator.device))
    work = Path(run.workdir)
    plots = work / PLOTS
    ensure_writable(work / CHECKPOINTS)
    ensure_writable(plots)
    stages = plan_stages(run)
    if not run.resume:  # before any stage redoes the work of an interrupted study
        for output, stage_run in stages.trained(run.job):
            keep_interrupted_run(run_paths(output)["last"], stage_run)
    remade: set[Path] = set()
    if run.job in (None, SPARSE_JOB):
        heading(f"1. sparse training ({run.train_epochs} epochs, λ={run.sparsity:g})")
        action = stage_action(run, stages.train, stages.sparse, upstream_ran=False)
        if action != "skip":
            cmd_train(stages.train.replace(resume=action == "resume"), accelerator, plots)
            remade.add(stages.sparse)
        if run.job == SPARSE_JOB:
            return []
    elif not stages.sparse.exists():
        raise ConfigError(f"--job {run.job} needs the sparse stage's {stages.sparse}, which does "
                          "not exist; run --job sparse first")
    if run.targets:  # the budgets of the rounds before the last scale from the unpruned size
        stages = plan_stages(run, unpruned_sizes(stages.sparse, run.image_size))
    if run.job != REPORT_JOB:
        for chain in stages.chains:
            if run.job in (None, chain.tag):
                run_chain(run, chain, accelerator, plots, remade)
        if run.job is not None:
            return []
    dist.barrier()
    rows = study_rows(run, stages)
    if dist.is_main():
        print_rows(rows)
        finish_study(run, stages.sparse, [r for r in rows if r.final], plots, rows)
    return rows


def run_chain(run: RunConfig, chain: Chain, accelerator, plots: Path, remade: set[Path]) -> None:
    """Run ``chain``'s stages in order, each skipped or resumed where --resume may (a stage
    whose input was remade runs afresh); ``remade`` gains the files remade."""
    for stage in chain.stages:
        if STAGE_RUNNERS[stage.kind](run, chain, stage, accelerator, plots,
                                     _upstream_ran(stage, remade)):
            remade.add(stage.output)


def _upstream_ran(stage: Stage, remade: set[Path]) -> bool:
    """Whether an input of ``stage`` was remade in this run, or since ``stage``'s own file was
    written (by another job of the study: a sparse stage trained on after this chain ran)."""
    if any(p in remade for p in stage.inputs):
        return True
    mine = run_paths(stage.output)["last"] if stage.kind != "prune" else stage.output
    mine = mine if mine.exists() else stage.output
    if not mine.exists():
        return False
    made = mine.stat().st_mtime_ns
    return any(p.exists() and p.stat().st_mtime_ns > made for p in stage.inputs)


def _run_prune(run: RunConfig, chain: Chain, stage: Stage, accelerator, plots: Path,
               upstream_ran: bool) -> bool:
    """Prune (unless --resume may reuse the file); whether it pruned."""
    of = f" (round {stage.round} of {run.passes})" if run.passes > 1 else ""
    heading(f"2. prune to {chain.label}{of} -> {stage.output.name}")
    if reusable_prune(run, stage.run, stage.output, upstream_ran=upstream_ran) is not None:
        return False
    cmd_prune(stage.run, accelerator, plots)
    return True


def _run_finetune(run: RunConfig, chain: Chain, stage: Stage, accelerator, plots: Path,
                  upstream_ran: bool) -> bool:
    """Fine-tune (skipped or resumed where --resume may); whether it trained."""
    heading(f"3. fine-tune {Path(stage.run.checkpoint).name} ({stage.run.epochs} epochs)")
    action = stage_action(run, stage.run, stage.output, upstream_ran=upstream_ran)
    if action == "fresh" and run.resume:
        _drop_stale_state(stage.output)
    if action != "skip":
        cmd_finetune(stage.run.replace(resume=action == "resume"), accelerator, plots)
    return action != "skip"


def _run_scratch(run: RunConfig, chain: Chain, stage: Stage, accelerator, plots: Path,
                 upstream_ran: bool) -> bool:
    """Train the pruned architecture from scratch (skipped or resumed where --resume may);
    whether it trained."""
    kind = stage.run.scratch
    heading(f"4. Scratch-{kind}: {Path(stage.run.scratch_from).name}'s architecture from fresh "
           f"weights -> {stage.output.name}")
    planned = scratch_plan(stage.run)[0]  # Scratch-B's epochs: what --resume compares
    action = stage_action(run, planned, stage.output, upstream_ran=upstream_ran)
    if action == "fresh" and run.resume:
        _drop_stale_state(stage.output)
    if action != "skip":
        cmd_train(stage.run.replace(resume=action == "resume"), accelerator, plots)
    return action != "skip"


STAGE_RUNNERS = {"prune": _run_prune, "finetune": _run_finetune, "scratch": _run_scratch}


def study_rows(run: RunConfig, stages: Stages) -> list[StudyRow]:
    """One row per round of every chain, read from the chains' files."""
    missing = [p for p in stages.made() if p != stages.sparse and not p.exists()]
    if missing:
        raise ConfigError(f"the study's report needs every chain's files, and {missing[0]} does "
                          "not exist; run the chain's job first (pipeline --job "
                          f"{_chain_of(stages, missing[0])}), or the whole study with --resume")
    rows = []
    for chain in stages.chains:
        for p in range(1, run.passes + 1):
            pruned, tuned = chain.stage("prune", p).output, chain.stage("finetune", p).output
            record = PruneRecord.from_dict(load_checkpoint(pruned).get("prune"))
            best = load_checkpoint(tuned)
            scratch = chain.stage("scratch", p)
            rows.append(StudyRow(
                chain.label, chain.tag, p, p == run.passes, record.ratio, str(tuned),
                str(pruned), record.params_after, best.get("best_acc"), record.acc_after,
                macs=record.macs_after, criterion=record.criterion,
                allocation=record.allocation, acc_after_stale=record.acc_after_stale,
                bn_recalibrate=record.bn_recalibrate,
                scratch=scratch.run.scratch if scratch else None,
                scratch_acc=load_checkpoint(scratch.output).get("best_acc") if scratch else None))
    return rows


def _chain_of(stages: Stages, path: Path) -> str:
    return next(c.tag for c in stages.chains if path in [s.output for s in c.stages])


def unpruned_sizes(sparse: Path, input_size: int) -> dict[str, int]:
    """Params and MACs of the sparse-trained (unpruned) model."""
    shape = copy_to_meta(build_model(load_checkpoint(sparse)))
    return {kind: model_size(shape, kind, input_size) for kind in ("params", "macs")}

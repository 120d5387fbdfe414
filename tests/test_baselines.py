"""The baselines slimming is compared with: adaptive BatchNorm right after pruning
(trainer.train.loop.recalibrate_bn, prune --bn-recalibrate), training a pruned architecture from
scratch (train --scratch-from, Scratch-E/B), and the study's table and figure
(trainer.measure.report.comparison_markdown, trainer.measure.plots.plot_accuracy_vs_macs)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import thop
import torch
import torch.nn.functional as F

from tests.helpers import randomize, small_cfg
from trainer.cli.info import prune_line
from trainer.commands.worker import run_worker
from trainer.config.settings import RunConfig
from trainer.data.datasets import build_datasets
from trainer.data.loaders import make_test_loader, make_train_loader
from trainer.files.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from trainer.measure.plots import plot_accuracy_vs_macs
from trainer.measure.report import StudyRow, comparison_markdown, write_report
from trainer.models.build import fresh_like, new_model
from trainer.models.family import ChannelSelection, batchnorms
from trainer.prune.engine import prune
from trainer.train.loop import recalibrate_bn

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL_VGG = [16, "M", 32, "M", 32, 32, "M", 64, 64, "M", 64, 64]
SYNTHETIC = {"dataset": "synthetic", "image_size": 32, "synthetic_train": 32,
             "synthetic_test": 16, "batch_size": 8, "cpu": True, "num_workers": 0}


# ---------------------------------------------------------------- adaptive BN


@torch.no_grad()
def _eval_acc(model, loader) -> float:
    model.eval()
    hits = total = 0
    for x, y in loader:
        hits += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * hits / total


def test_recalibration_restores_eval_accuracy_of_stale_statistics():
    """A small VGG trained briefly, then given back its initial running statistics (stale, as
    a pruned network's are): eval-mode accuracy collapses; re-estimated on 10 training
    batches it is back to the trained network's."""
    ds = build_datasets("synthetic", "unused", image_size=32, synthetic_train=400,
                        synthetic_test=200, seed=0)
    torch.manual_seed(0)
    model = new_model("vgg11", 10, SMALL_VGG)
    stale = {k: v.clone() for k, v in model.state_dict().items()
             if "running" in k or "num_batches" in k}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train = make_train_loader(ds, batch_size=32, num_workers=0, seed=0)
    for epoch in range(6):
        train.set_epoch(epoch)
        model.train()
        for x, y in train:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    test = make_test_loader(ds, batch_size=100, num_workers=0)
    trained = _eval_acc(model, test)
    model.load_state_dict({**model.state_dict(), **stale})
    stale_acc = _eval_acc(model, test)
    weights = {k: v.clone() for k, v in model.state_dict().items() if k not in stale}
    used = recalibrate_bn(model, make_train_loader(ds, batch_size=32, num_workers=0, seed=1), 10)
    recalibrated = _eval_acc(model, test)
    assert used == 10 and trained > 35
    assert stale_acc < trained - 20, (stale_acc, trained)
    assert recalibrated > trained - 5, (recalibrated, trained)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert all(bn.momentum == 0.1 and int(bn.num_batches_tracked) == 10
               for _, bn in batchnorms(model))


def test_recalibration_without_a_batch_leaves_the_statistics():
    model = randomize(new_model("vgg11", 10, SMALL_VGG))
    before = copy.deepcopy(model.state_dict())
    assert recalibrate_bn(model, [], 5) == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not model.training


def _sparse_file(tmp_path, arch="resnet50"):
    torch.manual_seed(0)
    model = new_model("resnet50", 10, small_cfg(4)) if arch == "resnet50" else \
        new_model(arch, 10, SMALL_VGG)
    path = tmp_path / "sparse.pth"
    save_checkpoint(path, make_checkpoint(randomize(model, seed=1)))
    return path


@pytest.mark.parametrize("batches", [0, 3])
def test_prune_saves_the_recalibrated_statistics_and_both_accuracies(tmp_path, monkeypatch,
                                                                      batches):
    monkeypatch.chdir(tmp_path)
    src = _sparse_file(tmp_path)
    out = tmp_path / "p.pth"
    run = RunConfig(command="prune", checkpoint=str(src), output=str(out), ratio=0.5,
                    scope="prunable", bn_recalibrate=batches, **SYNTHETIC)
    assert run_worker(run) == 0
    ckpt = load_checkpoint(out)
    record = ckpt["prune"]
    assert record["bn_recalibrate"] == batches
    assert (record["acc_after_stale"] is None) == (batches == 0)
    tracked = {int(v) for k, v in ckpt["state_dict"].items() if k.endswith("num_batches_tracked")}
    assert tracked == {batches}  # the source's are 0: untouched without recalibration
    source = load_checkpoint(src)["state_dict"]
    changed = not torch.equal(ckpt["state_dict"]["layer1.0.bn3.running_mean"],
                              source["layer1.0.bn3.running_mean"])
    assert changed == bool(batches)
    assert ("re-estimated on 3" in prune_line(record)) == bool(batches)


# ---------------------------------------------------------------- training from scratch


def _pruned_vgg(tmp_path, ratio=0.3):
    """A pruned VGG-11 as training leaves one: every tensor moved from its initial value."""
    torch.manual_seed(0)
    full = randomize(new_model("vgg11", 10), seed=2)
    with torch.no_grad():
        full.classifier.bias.normal_()  # zero when fresh
    pruned = prune(full, ratio).model
    for _, bn in batchnorms(pruned):
        bn.num_batches_tracked.fill_(7)
    path = tmp_path / "p.pth"
    save_checkpoint(path, make_checkpoint(pruned))
    return path, full, pruned


def test_scratch_b_runs_the_epochs_of_the_formula(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src, full, pruned = _pruned_vgg(tmp_path)
    x = torch.zeros(1, 3, 32, 32)
    macs_full, _ = thop.profile(copy.deepcopy(full).eval(), inputs=(x,), verbose=False)
    macs_pruned, _ = thop.profile(copy.deepcopy(pruned).eval(), inputs=(x,), verbose=False)
    expected = int(2 * macs_full / macs_pruned)  # the official main_B.py's int()
    assert expected > 2
    run = RunConfig(command="train", scratch_from=str(src), scratch="B", arch="vgg11", epochs=2,
                    lr=0.01, gamma_init=0.5, warmup_epochs=0.0, **SYNTHETIC)
    assert run_worker(run) == 0
    out = tmp_path / "p_scratchB.pth"
    ckpt = load_checkpoint(out)
    assert ckpt["scratch"]["epochs"] == expected and ckpt["scratch"]["base_epochs"] == 2
    assert ckpt["config"]["epochs"] == expected and ckpt["config"]["sparsity"] == 0
    assert ckpt["cfg"] == load_checkpoint(src)["cfg"]  # the pruned architecture
    rows = (tmp_path / "p_scratchB_metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + expected


def test_a_scratch_run_starts_from_fresh_weights(tmp_path, monkeypatch):
    """The model train --scratch-from hands to training shares no tensor with the pruned
    file (Scratch-E: the epochs asked)."""
    import trainer.commands.train as train_cmd

    src, _, _ = _pruned_vgg(tmp_path)
    seen = {}

    def capture(run, accelerator, model, data, **kwargs):
        seen.update(run=run, model=model, extra=kwargs["extra"])

    monkeypatch.setattr(train_cmd, "run_training", capture)
    run = RunConfig(command="train", scratch_from=str(src), arch="vgg11", epochs=3,
                    gamma_init=0.5, warmup_epochs=0.0, **SYNTHETIC)
    assert run_worker(run) == 0
    pruned = load_checkpoint(src)["state_dict"]
    fresh = seen["model"].state_dict()
    assert fresh.keys() == pruned.keys()
    same = [k for k, v in fresh.items()
            if v.shape == pruned[k].shape and torch.equal(v, pruned[k])]
    assert not same
    assert seen["run"].epochs == 3 and seen["extra"]["scratch"]["kind"] == "E"


def test_fresh_like_keeps_only_the_channel_selections():
    torch.manual_seed(0)
    model = randomize(new_model("densenet40", 10))
    pruned = prune(model, 0.5).model
    torch.manual_seed(1)
    fresh = fresh_like(pruned, 0.5)
    for name, module in fresh.named_modules():
        if isinstance(module, ChannelSelection):
            assert torch.equal(module.indexes, pruned.get_submodule(name).indexes)
    assert not torch.equal(fresh.dense2[3].conv1.weight, pruned.dense2[3].conv1.weight)
    assert all(float(bn.weight.detach().min()) == float(bn.weight.detach().max()) == 0.5
               for _, bn in batchnorms(fresh))
    x = torch.randn(2, 3, 32, 32)
    assert fresh.eval()(x).shape == (2, 10)


# ---------------------------------------------------------------- the comparison


def _rows() -> list[dict]:
    rows = []
    for criterion, accs in (("bn", (60.0, 70.0, 68.0)), ("l1", (40.0, 66.0, 68.5))):
        for allocation, macs in (("global", 30e6), ("uniform", 40e6)):
            for target, scale in (("ratio 0.5", 1.0), ("ratio 0.7", 0.6)):
                row = StudyRow(target=target, tag="x", round=1, final=True, ratio=None,
                               checkpoint="c.pth", pruned="p.pth", params=int(2e6 * scale),
                               best_acc=accs[1] * scale, acc_after=accs[0] * scale,
                               macs=int(macs * scale), criterion=criterion,
                               allocation=allocation, acc_after_stale=10.0, bn_recalibrate=20,
                               scratch="B", scratch_acc=accs[2] * scale)
                rows.append(dataclasses.asdict(row) | {"best_acc_std": 1.25})
    return rows


def test_the_comparison_table_has_a_row_per_criterion_allocation_and_target(tmp_path):
    rows = _rows()
    lines = comparison_markdown(rows)
    assert "adaptive BN on 20 batches" in lines[0] and "Scratch-B (%)" in lines[0]
    assert len(lines) == 2 + 8
    assert "| l1 | uniform | ratio 0.7 | 1.20 | 24.00 | 10.00 | 24.00 | 39.60 ± 1.25 | 41.10 |" \
        in lines
    path = write_report(tmp_path, title="t", rows=[], figures=[], comparison_rows=rows)
    text = path.read_text()
    assert "## Criteria and baselines" in text and "adaptive BN, Li et al. 2020" in text
    no_scratch = [{k: v for k, v in r.items() if k != "scratch_acc"} for r in rows]
    assert "Scratch" not in comparison_markdown(no_scratch)[0]


def test_the_accuracy_vs_macs_figure(tmp_path):
    png = plot_accuracy_vs_macs(_rows(), tmp_path / "acc_macs.png", title="criteria",
                                baseline={"macs": 80e6, "best_acc": 75.0})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no accuracies"):
        plot_accuracy_vs_macs([{"criterion": "bn", "macs": 1}], tmp_path / "x.png", title="x")


def test_info_says_the_criterion_allocation_and_recalibration():
    assert prune_line({"source": "s.pth", "ratio": 0.5, "threshold": 0.01}) == \
        "pruned from s.pth at ratio 0.5 by bn, global (threshold 0.01)"
    line = prune_line({"source": "s.pth", "ratio": 0.5, "threshold": None, "criterion": "l1",
                       "allocation": "uniform", "bn_recalibrate": 20})
    assert line == ("pruned from s.pth at ratio 0.5 by l1, uniform (⌊ratio·C⌋ of every layer); "
                    "BN statistics re-estimated on 20 training batches")


# ---------------------------------------------------------------- the study: pipeline


def test_pipeline_plans_a_chain_per_criterion_allocation_and_target(tmp_path):
    """Slimming alone keeps today's files and jobs; every other (criterion, allocation) gets
    its own chain, files and job, and --scratch a scratch stage at the end of each."""
    from trainer.commands.pipeline import plan_stages
    from trainer.commands.summary import _baselines
    from trainer.config.commands import config_from_options
    from trainer.config.study import job_names, job_outputs

    base = {"workdir": str(tmp_path), "ratios": "0.5,0.9"}
    default = config_from_options("pipeline", base)
    plan = plan_stages(default)
    assert [c.tag for c in plan.chains] == ["50", "90"] and not _baselines(default)
    assert [s.output.name for s in plan.chains[0].stages] == ["model_prune_50.pth",
                                                              "model_prune_50_finetune.pth"]
    run = config_from_options("pipeline", {**base, "criteria": "bn,l1", "allocations":
                                           "global,uniform", "scratch": "B", "passes": 2})
    plan = plan_stages(run)
    tags = [c.tag for c in plan.chains]
    assert tags == ["50", "90", "bn_uniform_50", "bn_uniform_90", "l1_50", "l1_90",
                    "l1_uniform_50", "l1_uniform_90"]
    assert job_names(run) == ["sparse", *tags, "report"]
    made = [p.name for p in plan.made()]
    assert len(made) == len(set(made)) == 1 + 8 * 5  # 2 rounds of 2 files + scratch, per chain
    chain = plan.chains[5]
    assert (chain.criterion, chain.allocation) == ("l1", "global")
    prunes = [s.run for s in chain.stages if s.kind == "prune"]
    assert {(r.criterion, r.allocation) for r in prunes} == {("l1", "global")}
    scratch = chain.stages[-1]
    assert scratch.kind == "scratch" and scratch.output.name == "model_prune_l1_90_p2_scratchB.pth"
    assert scratch.run.scratch_from == str(chain.stages[-3].output)  # the last pruned file
    assert scratch.run.sparsity == 0 and scratch.run.epochs == run.train_epochs
    assert scratch.run.lr == run.train_lr and scratch.run.command == "train"
    assert [p.name for p in job_outputs(run, "l1_90")] == [s.output.name for s in chain.stages]
    assert all(s.run.scratch is None for c in plan.chains for s in c.stages if s.kind != "scratch")
    assert plan.train.scratch is None and _baselines(run)


@pytest.mark.slow  # a sparse run, 3 prunes, 3 fine-tunes and 3 Scratch-B runs of VGG-11: ~1 min
def test_pipeline_criteria_and_scratch_write_the_combined_report_and_figure(tmp_path):
    from tests.helpers import run_cli

    work = tmp_path / "study"
    out = run_cli("pipeline", "--arch", "vgg11", "--dataset", "synthetic", "--image-size", 32,
                  "--synthetic-train", 160, "--synthetic-test", 80, "--train-epochs", 1,
                  "--finetune-epochs", 1, "--ratios", 0.3, "--batch-size", 32,
                  "--finetune-batch-size", 40, "--bn-recalibrate", 2, "--cpu",
                  "--num-workers", 0, "--criteria", "bn,l1,random", "--scratch", "B",
                  "--workdir", work, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    ckpts = work / "checkpoints"
    report = (work / "report.md").read_text()
    section = report[report.index("## Criteria and baselines"):]
    assert "adaptive BN on 2 batches" in section and "Scratch-B (%)" in section
    for criterion, tag in (("bn", "30"), ("l1", "l1_30"), ("random", "random_30")):
        record = load_checkpoint(ckpts / f"model_prune_{tag}.pth")["prune"]
        assert (record["criterion"], record["allocation"]) == (criterion, "global")
        assert record["bn_recalibrate"] == 2
        tuned = load_checkpoint(ckpts / f"model_prune_{tag}_finetune.pth")
        scratch = load_checkpoint(ckpts / f"model_prune_{tag}_scratchB.pth")
        plan = scratch["scratch"]
        assert plan["kind"] == "B" and plan["base_epochs"] == 1
        assert plan["epochs"] == plan["macs_unpruned"] // plan["macs_pruned"] >= 1
        assert scratch["config"]["sparsity"] == 0
        row = next(line for line in section.splitlines()
                   if line.startswith(f"| {criterion} | global | ratio 0.3 |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[3] == f"{record['params_after'] / 1e6:.2f}"
        assert cells[5:] == [f"{record['acc_after_stale']:.2f}", f"{record['acc_after']:.2f}",
                             f"{tuned['best_acc']:.2f}", f"{scratch['best_acc']:.2f}"]
    for png in ("accuracy_vs_macs.png", "comparison_30_finetuned.png"):
        assert (work / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    assert "](plots/accuracy_vs_macs.png)" in report

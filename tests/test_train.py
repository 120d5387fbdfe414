"""Training and fine-tuning (trainer.train.loop, fit, runtime, worker): the sparsity term,
the default recipe's stability, the LR schedule, best-checkpoint semantics, output naming,
the metrics CSV, the curves and determinism. In-process; the CLI is
tested in test_workflow_cli.py."""

from __future__ import annotations

import copy
import csv
import math
import types
from pathlib import Path

import matplotlib.image as mpimg
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import make_small_checkpoint, small_cfg
from trainer.commands.worker import run_worker
from trainer.config import paths
from trainer.config.archs import with_recipe
from trainer.config.checks import validate
from trainer.config.settings import FINETUNE_RECIPE as FINETUNE_DEFAULTS
from trainer.config.settings import TRAIN_RECIPE as TRAIN_DEFAULTS
from trainer.config.settings import RunConfig
from trainer.files.checkpoint import load_checkpoint, safe_torch_load
from trainer.models import build as models
from trainer.models.family import batchnorms
from trainer.models.resnet import ResNet50
from trainer.train import fit, runtime
from trainer.train import loop as engine

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def assert_png(path: Path) -> None:
    path = Path(path)
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def finetune_cfg(data_dir: Path, ckpt: Path, **over) -> RunConfig:
    """The lab fine-tune recipe on the fake CIFAR-10, made tiny."""
    values = dict(FINETUNE_DEFAULTS, command="finetune", dataset="cifar10",
                  data_dir=str(data_dir), download=False, checkpoint=str(ckpt), epochs=3,
                  batch_size=20, cpu=True, num_workers=0, limit_batches=2, seed=0)
    values.update(over)
    return RunConfig(**values)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------- the sparsity term


def test_add_sparsity_grad_adds_lambda_sign_gamma():
    model = ResNet50(widths=small_cfg(2))
    bn = model.layer1[0].bn1
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, -0.25]))
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.125)
    engine.add_sparsity_grad(torch.nn.DataParallel(model), 0.01)  # wrappers are looked through
    assert torch.allclose(bn.weight.grad, torch.tensor([0.135, 0.115]))
    assert torch.equal(bn.bias.grad, torch.full((2,), 0.125))  # β is not penalised
    assert torch.equal(model.conv1.weight.grad, torch.full_like(model.conv1.weight, 0.125))
    with torch.no_grad():
        model.bn1.weight.zero_()  # sign(0) = 0: a zero γ gets no push
    model.bn1.weight.grad = torch.zeros(64)
    engine.add_sparsity_grad(model, 0.01)
    assert torch.equal(model.bn1.weight.grad, torch.zeros(64))
    before = bn.weight.grad.clone()
    engine.add_sparsity_grad(model, 0.0)  # λ = 0: plain training
    assert torch.equal(bn.weight.grad, before)


def one_sgd_step(model: torch.nn.Module, lam: float, batch) -> torch.optim.Optimizer:
    """One step of the real train loop with the default train recipe (SGD, momentum 0.9)."""
    cfg = RunConfig(command="train", **dict(TRAIN_DEFAULTS, warmup_epochs=0.0, sparsity=lam),
                    cpu=True, num_workers=0)
    accelerator = runtime.make_accelerator(cfg)
    optimizer = engine.make_optimizer(model, cfg)
    engine.train_one_epoch(model, [batch], optimizer, accelerator=accelerator, run=cfg, epoch=0)
    return optimizer


def test_sparsity_changes_gamma_by_lr_lambda_sign_in_one_sgd_step():
    torch.manual_seed(0)
    base = ResNet50(widths=small_cfg(3))
    with torch.no_grad():  # γ of both signs, none zero
        for _, bn in batchnorms(base):
            bn.weight.copy_(torch.randn_like(bn.weight).clamp(-2, 2))
            bn.weight[bn.weight.abs() < 0.05] = 0.5
    gamma0 = {n: bn.weight.detach().clone() for n, bn in batchnorms(base)}
    batch = (torch.randn(8, 3, 32, 32), torch.arange(8) % 10)
    lr, lam = TRAIN_DEFAULTS["lr"], 1e-3
    assert TRAIN_DEFAULTS["optimizer"] == "sgd" and lr == 0.1
    plain, sparse = copy.deepcopy(base), copy.deepcopy(base)
    opt = one_sgd_step(plain, 0.0, batch)
    one_sgd_step(sparse, lam, batch)
    # momentum 0.9 is on, but at step 1 the buffer IS the gradient: no momentum effect yet
    assert opt.param_groups[0]["momentum"] == 0.9
    assert opt.param_groups[0]["weight_decay"] == 1e-4
    assert opt.param_groups[0]["lr"] == lr
    plain_bns, sparse_bns = dict(batchnorms(plain)), dict(batchnorms(sparse))
    for name, g0 in gamma0.items():
        delta = sparse_bns[name].weight.detach() - plain_bns[name].weight.detach()
        expected = -lr * lam * torch.sign(g0)
        assert torch.allclose(delta, expected, rtol=0, atol=1e-6), name
    gap = (sparse_bns["bn1"].weight - plain_bns["bn1"].weight).detach().abs().min()
    assert float(gap) > 0.9e-4
    # every other parameter (β, convs, fc) moved identically
    sp = dict(sparse.named_parameters())
    for name, p in plain.named_parameters():
        if not (name.endswith(".weight") and name.replace(".weight", "") in plain_bns):
            assert torch.equal(p, sp[name]), name


def test_the_l1_term_keeps_its_size_under_the_fp16_loss_scaler():
    """fp16 on CUDA gives Accelerate a GradScaler: backward() leaves the grads ×2**16 and
    step() divides by it. Added in between, λ·sign(γ) shrank 65536-fold (sparse training in
    fp16 was not sparse). The CPU builds no scaler, so this one is put in by hand."""
    torch.manual_seed(0)
    base = ResNet50(widths=small_cfg(3))
    batch = (torch.randn(8, 3, 32, 32), torch.arange(8) % 10)
    lam = 1e-3
    cfg = RunConfig(command="train", **dict(TRAIN_DEFAULTS, warmup_epochs=0.0, sparsity=lam),
                    cpu=True, num_workers=0)
    accelerator = runtime.make_accelerator(cfg)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    scaled = copy.deepcopy(base)
    optimizer = accelerator.prepare_optimizer(engine.make_optimizer(scaled, cfg))
    engine.train_one_epoch(scaled, [batch], optimizer, accelerator=accelerator, run=cfg,
                           epoch=0)
    assert accelerator.scaler.get_scale() == 2.0 ** 16  # the step was taken, not skipped
    plain, sparse = copy.deepcopy(base), copy.deepcopy(base)
    one_sgd_step(plain, 0.0, batch)
    one_sgd_step(sparse, lam, batch)
    plain_bns, sparse_bns = dict(batchnorms(plain)), dict(batchnorms(sparse))
    for name, bn in batchnorms(scaled):
        delta = bn.weight.detach() - plain_bns[name].weight.detach()
        expected = sparse_bns[name].weight.detach() - plain_bns[name].weight.detach()
        assert torch.allclose(delta, expected, rtol=1e-3, atol=1e-7), name


# ---------------------------------------------------------------- the default train recipe


@pytest.mark.slow
def test_default_train_recipe_is_stable_and_learns(monkeypatch):
    """A few dozen steps of the real default recipe (TRAIN_DEFAULTS: SGD lr 0.1, momentum 0.9,
    wd 1e-4, 1 warm-up epoch) on the full-width model as ``train`` builds it."""
    steps, epochs, batch = 4, 6, 32  # warm-up over epoch 0, then 20 steps at lr 0.1
    cfg = with_recipe(RunConfig(
        command="train", **dict(TRAIN_DEFAULTS, batch_size=batch), dataset="synthetic",
        synthetic_train=steps * batch, synthetic_test=16, limit_batches=steps,
        cpu=True, num_workers=0, seed=0))
    assert TRAIN_DEFAULTS["lr"] == 0.1 and TRAIN_DEFAULTS["epochs"] > 2 * epochs  # no LR drop
    accelerator = runtime.make_accelerator(cfg)
    data = runtime.load_data(cfg)
    train_loader = runtime.training_loader(cfg, data, accelerator)
    torch.manual_seed(cfg.seed)
    model = models.fresh_model(cfg.arch, data.num_classes, cfg.gamma_init)  # as cmd_train does
    optimizer = engine.make_optimizer(model, cfg)
    model, optimizer = runtime.prepare_model(model, cfg, accelerator, optimizer)
    losses: list[float] = []

    def recording_ce(*args, **kwargs):
        loss = F.cross_entropy(*args, **kwargs)
        losses.append(loss.item())
        return loss

    monkeypatch.setattr(engine, "F", types.SimpleNamespace(cross_entropy=recording_ce))
    for epoch in range(epochs):
        train_loader.set_epoch(epoch)
        engine.train_one_epoch(model, train_loader, optimizer, accelerator=accelerator,
                               run=cfg, epoch=epoch)
    assert len(losses) == steps * epochs
    shown = [round(v, 3) for v in losses]
    assert all(math.isfinite(v) for v in losses), shown
    assert max(losses) < 3.0, shown  # never blows up (diverging runs reach 1e6)
    first, last = sum(losses[:steps]) / steps, sum(losses[-steps:]) / steps
    assert last < first - 0.05, shown


# ---------------------------------------------------------------- LR schedule


def test_lab_lr_schedule_per_epoch():
    cfg = RunConfig(command="finetune", **FINETUNE_DEFAULTS)
    assert cfg.epochs == 20 and cfg.lr == 1e-3 and cfg.warmup_epochs == 0
    assert engine.lr_milestones(20) == [10, 15]
    lrs = [engine.lr_at(cfg, e) for e in range(20)]
    expected = [1e-3] * 10 + [1e-4] * 5 + [1e-5] * 5
    assert lrs == pytest.approx(expected, rel=1e-9)
    # the LR within an epoch does not depend on the step (no warm-up in the lab recipe)
    assert engine.lr_at(cfg, 12, step=7, steps_per_epoch=500) == pytest.approx(1e-4)


@pytest.mark.parametrize("epochs", [2, 3, 4, 7, 20, 30])  # 1: see below
def test_lr_at_matches_torch_multisteplr(epochs):
    """The lab built MultiStepLR(milestones=[int(.5 E), int(.75 E)], gamma=0.1)."""
    cfg = RunConfig(command="finetune", epochs=epochs, lr=1e-3)
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-3)
    sched = torch.optim.lr_scheduler.MultiStepLR(
        opt, milestones=[int(epochs * 0.5), int(epochs * 0.75)], gamma=0.1)
    for epoch in range(epochs):
        assert engine.lr_at(cfg, epoch) == pytest.approx(opt.param_groups[0]["lr"]), epoch
        opt.step()
        sched.step()


def test_milestones_scale_with_epochs():
    assert engine.lr_milestones(160) == [80, 120]
    assert engine.lr_milestones(4) == [2, 3]
    assert engine.lr_milestones(1) == []  # a 1-epoch run never drops (MultiStepLR would ÷100)
    cfg = RunConfig(command="finetune", epochs=1, lr=1e-3)
    assert engine.lr_at(cfg, 0) == pytest.approx(1e-3)


def test_warmup_ramps_linearly_then_holds():
    cfg = RunConfig(command="train", **TRAIN_DEFAULTS)  # lr 0.1, 1 warm-up epoch
    steps = 10
    ramp = [engine.lr_at(cfg, 0, s, steps) for s in range(steps)]
    assert ramp == pytest.approx([0.1 * (s + 1) / steps for s in range(steps)])
    assert engine.lr_at(cfg, 1, 0, steps) == pytest.approx(0.1)
    two = cfg.replace(warmup_epochs=2.0)
    assert engine.lr_at(two, 1, 4, steps) == pytest.approx(0.1 * 1.5 / 2)
    assert engine.lr_at(two, 2, 0, steps) == pytest.approx(0.1)
    half = cfg.replace(warmup_epochs=0.5)
    assert engine.lr_at(half, 0, 4, steps) == pytest.approx(0.1)
    assert engine.lr_at(half, 0, 1, steps) == pytest.approx(0.1 * 0.2 / 0.5)


# ---------------------------------------------------------------- output naming


@pytest.mark.parametrize("command, over, out, plot", [
    ("finetune", {"checkpoint": "checkpoints/model_prune.pth"},
     "checkpoints/model_prune_finetune.pth", "plots/finetuning_results.png"),
    ("finetune", {"checkpoint": "checkpoints/model_prune_50.pth"},
     "checkpoints/model_prune_50_finetune.pth", "plots/model_prune_50_finetune.png"),
    ("finetune", {"checkpoint": "/data/x/model_prune.pth"},
     "/data/x/model_prune_finetune.pth", "plots/finetuning_results.png"),
    ("finetune", {}, "checkpoints/model_prune_finetune.pth", "plots/model_prune_finetune.png"),
    ("finetune", {"checkpoint": "a.pth", "output": "o/b.pth", "plot": "p/c.png"},
     "o/b.pth", "p/c.png"),
    ("train", {"sparsity": 1e-4}, "checkpoints/model_sparse.pth", "plots/model_sparse.png"),
    ("train", {"sparsity": 0.0}, "checkpoints/model.pth", "plots/model.png"),
    ("prune", {"ratio": 0.5}, "checkpoints/model_prune.pth", "plots/model_prune.png"),
    ("pipeline", {"workdir": "w"}, "w/checkpoints/model_sparse.pth", "plots/model_sparse.png"),
])
def test_output_and_plot_paths(command, over, out, plot):
    cfg = RunConfig(command=command, **over)
    output = paths.output_path(cfg)
    assert output == Path(out)
    assert paths.plot_path(cfg, output) == Path(plot)


def test_evaluate_writes_nothing():
    assert paths.output_path(RunConfig(command="evaluate", checkpoint="x.pth")) is None


def test_train_defaults_name_the_output_by_sparsity(tmp_path, fake_cifar10, monkeypatch):
    """``train`` without --output: checkpoints/model_sparse.pth when λ > 0 (real run)."""
    monkeypatch.chdir(tmp_path)
    init = make_small_checkpoint(tmp_path / "init.pth", width=2)
    cfg = RunConfig(command="train", **dict(TRAIN_DEFAULTS, epochs=1, batch_size=20,
                                            sparsity=1e-4, lr=0.01), init=str(init),
                    dataset="cifar10", data_dir=str(fake_cifar10), download=False, cpu=True,
                    num_workers=0, limit_batches=1)
    assert run_worker(cfg) == 0
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "model_sparse.pth")
    assert ckpt["config"]["sparsity"] == 1e-4 and ckpt["cfg"] == small_cfg(2)
    assert len(ckpt["history"]["epoch"]) == 1
    assert_png(tmp_path / "plots" / "model_sparse.png")
    assert not (tmp_path / "checkpoints" / "model.pth").exists()


# ---------------------------------------------------------------- best checkpoint


def test_best_checkpoint_written_only_on_improvement(tmp_path, fake_cifar10, monkeypatch):
    """A real 3-epoch fine-tune whose test accuracies are scripted to 30, 50, 40 %."""
    monkeypatch.chdir(tmp_path)
    src = make_small_checkpoint(tmp_path / "checkpoints" / "model_prune_50.pth", width=4,
                                prune={"ratio": 0.5, "threshold": 0.1, "source": "s.pth"})
    scripted = iter([30.0, 50.0, 40.0])
    real_evaluate = fit.evaluate

    def scripted_evaluate(*args, **kwargs):
        metrics = dict(real_evaluate(*args, **kwargs))
        metrics["accuracy"] = next(scripted)
        return metrics

    writes: list[tuple[str, int]] = []
    real_save = fit.save_checkpoint

    def recording_save(path, ckpt):
        writes.append((Path(path).name, ckpt["best_epoch"], len(ckpt["history"]["epoch"])))
        real_save(path, ckpt)

    monkeypatch.setattr(fit, "evaluate", scripted_evaluate)
    monkeypatch.setattr(fit, "save_checkpoint", recording_save)
    assert run_worker(finetune_cfg(fake_cifar10, src)) == 0
    out = tmp_path / "checkpoints" / "model_prune_50_finetune.pth"
    # written at epoch 1 (first result) and epoch 2 (improved), not at epoch 3 (worse)
    assert writes == [(out.name, 1, 1), (out.name, 2, 2)]
    best = load_checkpoint(out)
    assert best["best_acc"] == 50.0 and best["best_epoch"] == 2
    assert best["history"]["test_acc"] == [30.0, 50.0]
    assert best["best_acc"] == max(best["history"]["test_acc"])
    assert best["prune"]["ratio"] == 0.5  # the prune metadata travels on
    assert best["config"]["epochs"] == 3 and best["config"]["optimizer"] == "adam"
    last = safe_torch_load(out.with_name(out.stem + ".last.pth"))
    assert last["history"]["test_acc"] == [30.0, 50.0, 40.0]
    assert (last["best_acc"], last["best_epoch"]) == (50.0, 2)
    rows = read_csv(out.with_name(out.stem + "_metrics.csv"))
    assert [float(r["test_acc"]) for r in rows] == [30.0, 50.0, 40.0]
    assert_png(tmp_path / "plots" / "model_prune_50_finetune.png")


def test_finetune_history_csv_plot_and_determinism(tmp_path, fake_cifar10, monkeypatch):
    """Two real runs with the same seed: identical histories; files as documented."""
    monkeypatch.chdir(tmp_path)
    src = make_small_checkpoint(tmp_path / "checkpoints" / "model_prune.pth", width=4)
    histories = []
    for run in ("a", "b"):
        out = tmp_path / run / "model_prune_finetune.pth"
        cfg = finetune_cfg(fake_cifar10, src, epochs=2, output=str(out))
        assert run_worker(cfg) == 0
        ckpt = load_checkpoint(out)
        last = safe_torch_load(out.with_name(out.stem + ".last.pth"))
        hist = last["history"]
        histories.append(hist)
        assert hist["epoch"] == [1, 2]
        # milestones int(2 * 0.5) = int(2 * 0.75) = 1: MultiStepLR divides by 10 twice there
        assert hist["lr"] == pytest.approx([1e-3, 1e-5])
        assert all(0 <= a <= 100 for a in hist["test_acc"] + hist["train_acc"])
        assert all(math.isfinite(v) for v in hist["train_loss"] + hist["test_loss"])
        assert ckpt["best_acc"] == max(hist["test_acc"])
        assert ckpt["best_epoch"] == hist["test_acc"].index(max(hist["test_acc"])) + 1
        rows = read_csv(out.with_name(out.stem + "_metrics.csv"))
        assert len(rows) == 2 and list(rows[0]) == list(fit.HISTORY_KEYS)
        assert [float(r["train_loss"]) for r in rows] == pytest.approx(hist["train_loss"])
    # the lab's file name -> the lab's figure name
    assert_png(tmp_path / "plots" / "finetuning_results.png")
    assert histories[0] == histories[1]


def test_split_first_step_separates_the_compile_cost():
    from trainer.train.progress import split_first_step

    # 10 steps of 100 images at 0.5 s each, the first one 30.5 s (30 s compiling)
    excess, rate = split_first_step(30.5, 100, 30.5 + 9 * 0.5, 1000)
    assert excess == pytest.approx(30.0)
    assert rate == pytest.approx(200.0)
    assert split_first_step(3.0, 100, 3.0, 100) == (3.0, pytest.approx(100 / 3))  # one step
    assert split_first_step(0.1, 100, 1.0, 1000)[0] == 0.0  # a fast first step: no excess


def test_weights_that_diverge_in_the_last_step_stop_the_run_at_the_evaluation(
        tmp_path, fake_cifar10, monkeypatch):
    """The loss check sees each step's loss before its update; an update that breaks the
    weights shows first in the evaluation. Epoch 2's NaN test loss stops the run there and
    epoch 1's best checkpoint and resume state stay."""
    from trainer.errors import TrainingError

    monkeypatch.chdir(tmp_path)
    src = make_small_checkpoint(tmp_path / "s.pth", width=2)
    real_evaluate = fit.evaluate
    calls = iter(range(1, 10))

    def diverged_in_epoch_2(*args, **kwargs):
        metrics = dict(real_evaluate(*args, **kwargs))
        if next(calls) == 2:
            metrics["loss"] = math.nan
        return metrics

    monkeypatch.setattr(fit, "evaluate", diverged_in_epoch_2)
    out = tmp_path / "o" / "x.pth"
    with pytest.raises(TrainingError, match="test loss became non-finite after epoch 2"):
        run_worker(finetune_cfg(fake_cifar10, src, epochs=3, output=str(out)))
    assert load_checkpoint(out)["best_epoch"] == 1
    assert safe_torch_load(out.with_name("x.last.pth"))["epoch"] == 1


@pytest.mark.parametrize("field, value, needle", [
    ("lr", math.inf, "--lr inf"), ("lr", math.nan, "--lr nan"),
    ("sparsity", math.inf, "--sparsity inf"), ("weight_decay", math.nan, "--weight-decay nan"),
    ("momentum", 1.0, "--momentum 1.0: must be in [0, 1)"),
    ("seed", -1, "--seed -1"), ("dist_timeout", 0, "--dist-timeout 0"),
])
def test_validate_refuses_settings_that_cannot_train(field, value, needle):
    """The check names the parameter; the command line says it as its flag."""
    from trainer.errors import ParamError

    with pytest.raises(ParamError) as err:
        validate(RunConfig(command="finetune", checkpoint="x.pth", **{field: value}))
    assert str(err.value).startswith(field + " ")
    assert err.value.cli_message().startswith(needle) and "see --help" in err.value.cli_message()

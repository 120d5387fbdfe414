"""Distillation while fine-tuning (trainer.train.loop.kd_loss, finetune --teacher) and the two loose
ends of the loop: fp16's loss scaler in the resume state, and DDP padding left out of the
training metrics."""

from __future__ import annotations

import copy
import math
import signal

import pytest
import torch
import torch.nn.functional as F

from tests.fakedata import write_fake_cifar10
from tests.helpers import FAST, make_small_checkpoint, run_cli
from tests.test_distributed import check_finetune_output, expected_metrics
from trainer.config.settings import FINETUNE_RECIPE, RunConfig
from trainer.data.gpu_loader import real_samples
from trainer.errors import StopRequested
from trainer.files.checkpoint import load_checkpoint
from trainer.files.safeload import safe_torch_load
from trainer.models.resnet import ResNet50
from trainer.train import loop as engine
from trainer.train import runtime
from trainer.train.fit import fit

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_kd_loss_is_the_formula_on_hand_made_logits():
    student = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    teacher = torch.tensor([[1.0, 1.5, -0.5], [-2.0, 0.0, 2.5]])
    y = torch.tensor([0, 2])
    ce = F.cross_entropy(student, y)
    alpha, t = 0.7, 3.0
    kl = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        p = [math.exp(v / t) for v in t_row]
        q = [math.exp(v / t) for v in s_row]
        p, q = [v / sum(p) for v in p], [v / sum(q) for v in q]
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    want = alpha * t * t * kl / 2 + (1 - alpha) * ce.item()
    assert engine.kd_loss(student, teacher, ce, alpha, t).item() == pytest.approx(want, rel=1e-6)
    assert torch.equal(engine.kd_loss(student, teacher, ce, 0.0, t), ce)  # α = 0: plain CE


def _cfg(**over) -> RunConfig:
    return RunConfig(command="finetune", **dict(FINETUNE_RECIPE, epochs=2, batch_size=8),
                     cpu=True, num_workers=0, dataset="synthetic", synthetic_train=24,
                     synthetic_test=8, seed=0).replace(**over)


def test_a_teacher_changes_the_steps_and_alpha_zero_does_not(tmp_path):
    torch.manual_seed(0)
    student = ResNet50(widths=[4 if i % 3 else w for i, w in enumerate(ResNet50().widths)])
    teacher = runtime.prepare_teacher(ResNet50(widths=student.widths), _cfg(),
                                      runtime.make_accelerator(_cfg()))
    batch = [(torch.randn(8, 3, 32, 32), torch.arange(8) % 10)]

    def step(alpha: float, with_teacher: bool) -> torch.nn.Module:
        model = copy.deepcopy(student)
        cfg = _cfg(kd_alpha=alpha)
        acc = runtime.make_accelerator(cfg)
        opt = acc.prepare_optimizer(engine.make_optimizer(model, cfg))
        engine.train_one_epoch(model, batch, opt, accelerator=acc, run=cfg, epoch=0,
                               teacher=teacher if with_teacher else None)
        return model

    plain, zero, distilled = step(0.9, False), step(0.0, True), step(0.9, True)
    same = [torch.equal(a, b) for a, b in zip(plain.parameters(), zero.parameters())]
    assert all(same)
    assert not all(torch.equal(a, b) for a, b in zip(plain.parameters(),
                                                     distilled.parameters()))
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training


@pytest.mark.parametrize("n, world, expected", [(5, 2, [3, 2]), (6, 2, [3, 3]),
                                                (31, 4, [8, 8, 8, 7]), (2, 3, [1, 1, 0])])
def test_a_ranks_real_samples_leave_out_the_shard_padding(n, world, expected):
    assert [real_samples(n, r, world, 10 ** 6) for r in range(world)] == expected
    assert sum(expected) == n


@pytest.mark.parametrize("kind", ["torch", "gpu"])
def test_the_real_samples_of_all_ranks_are_the_dataset_once(kind):
    """Both loaders pad a rank's shard at its end: the first real_samples of every rank
    together are each sample exactly once (5 images, 2 ranks: 3 + 2, one padded)."""
    from trainer.data.datasets import build_datasets
    from trainer.data.loaders import make_train_loader

    data = build_datasets("synthetic", "", synthetic_train=5, synthetic_test=2)
    seen = []
    for rank in (0, 1):
        loader = make_train_loader(data, batch_size=2, num_workers=0, rank=rank, world_size=2,
                                   kind=kind, seed=3)
        loader.set_epoch(1)
        labels = torch.cat([y for _, y in loader])
        assert len(labels) == 3
        seen.append(labels[:loader.real_samples])
    assert sorted(torch.cat(seen).tolist()) == sorted(data.train_arrays[1].tolist())


def test_padding_is_trained_on_but_not_counted():
    """A rank whose shard ends in one padded sample: its metrics count the real ones only."""
    torch.manual_seed(0)
    model = ResNet50(widths=[4 if i % 3 else w for i, w in enumerate(ResNet50().widths)])
    cfg = _cfg()
    acc = runtime.make_accelerator(cfg)
    opt = acc.prepare_optimizer(engine.make_optimizer(model, cfg))

    class Shard(list):
        real_samples = 5  # of 3 + 3 samples: the last is padding

    x, y = torch.randn(6, 3, 32, 32), torch.arange(6) % 10
    batches = Shard([(x[:3], y[:3]), (x[3:], y[3:])])
    m = engine.train_one_epoch(model, batches, opt, accelerator=acc, run=cfg, epoch=0)
    assert m["train_samples"] == 5


def _stop_in_epoch_two(loader):
    """The loader as fit sees it, asking the loop to stop when epoch 2 starts."""
    real_set_epoch = loader.set_epoch

    def set_epoch(epoch: int) -> None:
        if epoch == 1:
            engine.STOP.signum = signal.SIGTERM
        real_set_epoch(epoch)

    loader.set_epoch = set_epoch
    return loader


@pytest.mark.slow  # three short fits, ~15 s
def test_a_resumed_fp16_run_ends_as_an_uninterrupted_one(tmp_path):
    """The GradScaler's state travels in the resume state. The CPU builds no scaler, so one is
    put in by hand, with a scale that overflows and halves (steps skipped) as training goes."""
    def run(folder, epochs_stop: bool, resume: bool):
        torch.manual_seed(0)
        model = ResNet50(widths=[4 if i % 3 else w for i, w in enumerate(ResNet50().widths)])
        cfg = _cfg(resume=resume, epochs=3)
        acc = runtime.make_accelerator(cfg)
        acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 126, growth_interval=1)
        data = runtime.load_data(cfg)
        train = runtime.training_loader(cfg, data, acc)
        train = _stop_in_epoch_two(train) if epochs_stop else train
        opt = acc.prepare_optimizer(engine.make_optimizer(model, cfg))
        try:
            return fit(model, opt, accelerator=acc, run=cfg, train_loader=train,
                       test_loader=runtime.evaluation_loader(cfg, data, acc),
                       output=folder / "x.pth", extra={}, title="t")
        finally:
            engine.STOP.signum = None

    whole = run(tmp_path / "a", False, False)
    with pytest.raises(StopRequested):
        run(tmp_path / "b", True, False)
    state = safe_torch_load(tmp_path / "b" / "x.last.pth")
    assert state["epoch"] == 1 and state["scaler"]["scale"] != 2.0 ** 126
    resumed = run(tmp_path / "b", False, True)
    assert resumed.history == whole.history


@pytest.mark.slow
def test_finetune_refuses_a_teacher_of_other_classes(tmp_path):
    make_small_checkpoint(tmp_path / "s.pth")
    make_small_checkpoint(tmp_path / "t.pth", num_classes=7)
    r = run_cli("finetune", "--checkpoint", "s.pth", "--teacher", "t.pth", "--cpu",
                "--dataset", "synthetic", "--synthetic-train", "16", "--synthetic-test", "8",
                "--epochs", "1", "--num-workers", "0", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --teacher t.pth has 7 classes but the model fine-tuned has 10; give a teacher "
        "trained on the same classes"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.pth", "t.pth"]


@pytest.mark.slow
def test_finetune_with_a_teacher_records_it(tmp_path):
    make_small_checkpoint(tmp_path / "s.pth")
    make_small_checkpoint(tmp_path / "t.pth", seed=3)
    r = run_cli("finetune", "--checkpoint", "s.pth", "--teacher", "t.pth", "--kd-alpha", "0.5",
                "--cpu", "--dataset", "synthetic", "--synthetic-train", "32",
                "--synthetic-test", "16", "--epochs", "1", "--batch-size", "16",
                "--num-workers", "0", "--output", "ft.pth", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    config = load_checkpoint(tmp_path / "ft.pth")["config"]
    assert (config["teacher"], config["kd_alpha"], config["kd_temperature"]) == ("t.pth", 0.5, 4.0)


@pytest.mark.slow  # a 1-process and a 2-process fine-tune, ~30-60 s
def test_a_two_process_fine_tune_with_a_teacher_measures_as_one_process(tmp_path):
    """The teacher on both gloo ranks, on an odd-sized training set (105 images: one padded
    sample): each run's test metrics are those of its saved weights over the whole test set
    (one pass here), and both record the teacher."""
    data = tmp_path / "data"
    write_fake_cifar10(data, n_per_batch=21, n_test=31)
    make_small_checkpoint(tmp_path / "s.pth", seed=2)
    make_small_checkpoint(tmp_path / "t.pth", seed=3)
    args = ["finetune", "--checkpoint", "s.pth", "--teacher", "t.pth", "--dataset", "cifar10",
            "--data-dir", str(data), "--no-download", *FAST, "--epochs", "1"]
    runs = {"one": [], "two": ["--gpus", "2"]}
    for name, extra in runs.items():
        out = tmp_path / name
        r = run_cli(*args, *extra, "--output", out / "x.pth", "--plot", out / "x.png",
                    cwd=tmp_path, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    two = check_finetune_output(tmp_path / "two", data, epochs=1,
                                extra_files={"accelerate_cpu_ddp_2proc.yaml"})
    one = load_checkpoint(tmp_path / "one" / "x.pth")
    truth = expected_metrics(tmp_path / "one" / "x.pth", data)
    assert one["history"]["test_acc"] == [truth["accuracy"]]
    assert one["history"]["test_loss"][0] == pytest.approx(truth["loss"], rel=1e-5)
    for ckpt in (one, two):
        assert ckpt["config"]["teacher"] == "t.pth" and ckpt["config"]["kd_alpha"] == 0.9

"""``import slimtune``: the Python API on a model written here (residual add, concatenation,
depthwise conv), the same file through the CLI with --arch module:factory, the parity of
``slimtune.prune`` with ``slimtune prune`` on every architecture of the registry, Sparsity under
fp16 loss scaling and Accelerate, and errors that name parameters."""

from __future__ import annotations

import importlib
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import slimtune
from tests.helpers import cli_env, randomize, run_cli
from trainer.config.archs import ARCHS
from trainer.config.usercode import allowing
from trainer.files.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from trainer.models.build import new_model
from trainer.prune.engine import prune as engine_prune
from trainer.prune.engine import units_of

MODULE = "slimnets_api22"  # a name no other test imports
SOURCE = '''
import torch
from torch import nn


class Block(nn.Module):
    """1x1 conv, then a depthwise 3x3 conv, added to the block's input (a residual add)."""

    def __init__(self, c):
        super().__init__()
        self.pw = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.pw(x)))
        return torch.relu(x + self.bn2(self.dw(y)))


class TinyNet(nn.Module):
    def __init__(self, num_classes=10, width=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.block = Block(width)
        self.left = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(width, width, 1, bias=False),
                                   nn.BatchNorm2d(width), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1,
                                            bias=False), nn.BatchNorm2d(2 * width), nn.ReLU())
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.block(self.stem(x))
        x = torch.cat([self.left(x), self.right(x)], 1)  # a concatenation
        x = self.head(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def make_net(num_classes):
    return TinyNet(num_classes=num_classes)
'''
ARCH = f"{MODULE}:TinyNet"


@pytest.fixture
def nets(tmp_path, monkeypatch):
    """The module of the user's model, importable (on sys.path and PYTHONPATH)."""
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / f"{MODULE}.py").write_text(SOURCE)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", str(folder))
    sys.modules.pop(MODULE, None)
    yield importlib.import_module(MODULE)
    sys.modules.pop(MODULE, None)


def _gammas(model: nn.Module, seed: int = 0) -> nn.Module:
    """Distinct |γ| (no ties) and random BN statistics: outputs depend on every channel."""
    return randomize(model, seed).train()


def test_the_notebook_on_a_model_of_ones_own(nets, tmp_path):
    """The issue's five lines: Sparsity in a plain loop, prune at 0.5 (half the prunable
    channels, the one at the threshold going with it), the pruned model runs with the
    coupled channels still coupled, and save -> load gives equal outputs."""
    torch.manual_seed(0)
    model = _gammas(nets.TinyNet(num_classes=10))
    reg = slimtune.Sparsity(model, lam=1e-4)
    loss = model(torch.randn(4, 3, 32, 32)).logsumexp(1).mean()
    loss.backward()
    before = model.stem[1].weight.grad.clone()
    reg.step()
    sign = torch.sign(model.stem[1].weight.detach())
    assert torch.allclose(model.stem[1].weight.grad, before + 1e-4 * sign)

    pruned, report = slimtune.prune(model, ratio=0.5)
    path = slimtune.save(pruned, tmp_path / "my_pruned.pth")

    scores = torch.cat([u.score for u in units_of(model) if u.prunable])
    removed = int((scores <= report.threshold).sum())
    assert removed == math.floor(len(scores) * 0.5) + report.ties  # distinct |γ|: ties == 1
    assert report.removed_fraction == pytest.approx(removed / len(scores))
    assert report.params_after < report.params_before
    assert 0 < report.macs_after < report.macs_before
    assert sum(kept for _, kept, _ in report.stages) == len(scores) - removed
    # the stream the residual add shares: stem, the depthwise conv and its BN, all one width
    width = pruned.stem[0].out_channels
    assert pruned.block.dw.out_channels == pruned.block.dw.groups == width < 16
    assert pruned.block.bn2.num_features == pruned.left[0].in_channels == width
    assert pruned.head[0].in_channels == pruned.left[0].out_channels + \
        pruned.right[0].out_channels  # the concatenation
    x = torch.randn(2, 3, 32, 32)
    assert pruned.eval()(x).shape == (2, 10)

    file = torch.load(path, weights_only=True)  # plain values: name, history, weights
    assert file["arch"] == ARCH and file["cfg"] == pruned.widths and file["num_classes"] == 10
    assert file["prune"]["ratio"] == 0.5
    for how in ({"factory": nets.TinyNet}, {"factory": ARCH}, {"model": nets.TinyNet(10)}):
        back = slimtune.load(path, **how).eval()
        assert torch.equal(back(x), pruned(x)), how
    with pytest.raises(slimtune.CheckpointError, match=r"slimtune imports no code because a "
                       rf"file names it: .*--arch {ARCH}.*slimtune\.load\(path, factory=TinyNet"):
        slimtune.load(path)
    with pytest.raises(slimtune.CheckpointError, match="own code"):
        slimtune.load(path, factory=nets.make_net)  # another factory than the file's


@pytest.mark.slow  # seven commands, each twice (~8 s)
def test_the_same_file_through_the_command_line(nets, tmp_path):
    """info, profile, compare, evaluate, finetune, export and prune read the saved file with --arch
    naming its factory (imported because the user typed it), and refuse it without; the CLI's
    prune gives the same widths as the API's."""
    torch.manual_seed(0)
    model = _gammas(nets.TinyNet(num_classes=10))
    slimtune.save(model, tmp_path / "net.pth")
    pruned, _ = slimtune.prune(model, ratio=0.5)
    slimtune.save(pruned, tmp_path / "p.pth")
    data = ["--dataset", "synthetic", "--synthetic-train", "40", "--synthetic-test", "20",
            "--cpu", "--num-workers", "0", "--batch-size", "20"]
    runs = {
        "info": ["info", "p.pth", "--json"],
        "profile": ["profile", "p.pth", "--json"],
        "compare": ["compare", "net.pth", "p.pth", "--output", "c.png", "--json"],
        "evaluate": ["evaluate", "p.pth", "--json", *data],
        "finetune": ["finetune", "--checkpoint", "p.pth", "--epochs", "1", *data],
        "export": ["export", "p.pth", "--format", "torchscript", "--output", "p.ts"],
        "prune": ["prune", "--checkpoint", "net.pth", "--ratio", "0.5", "--no-eval",
                  "--output", "cli.pth", "--cpu"],
    }
    for name, args in runs.items():
        refused = run_cli(*args, cwd=tmp_path, env=cli_env(PYTHONPATH=str(tmp_path / "code")))
        assert refused.returncode == 2, (name, refused.stderr)
        assert f"--arch {ARCH}" in refused.stderr and "own code" in refused.stderr, name
        done = run_cli(*args, "--arch", ARCH, cwd=tmp_path)
        assert done.returncode == 0, (name, done.stdout[-2000:], done.stderr[-2000:])
    with allowing(ARCH):
        assert load_checkpoint(tmp_path / "p_finetune.pth")["arch"] == ARCH
        assert load_checkpoint(tmp_path / "cli.pth")["cfg"] == pruned.widths
    assert ARCH in run_cli("info", "p.pth", "--arch", ARCH, cwd=tmp_path).stdout


@pytest.mark.slow  # a fresh interpreter that imports torch and trains an epoch (~15 s)
def test_train_builds_ones_own_model_in_a_fresh_process(nets, tmp_path):
    """``train --arch module:factory`` in a real process: the module comes from PYTHONPATH,
    the file names the factory, and info reads it back by that name."""
    result = run_cli("train", "--arch", f"{MODULE}:make_net", "--dataset", "synthetic",
                     "--synthetic-train", "40", "--synthetic-test", "20", "--image-size", "16",
                     "--epochs", "1", "--cpu", "--sparsity", "1e-4", "--output", "t.pth",
                     cwd=tmp_path, process=True,
                     env=cli_env(PYTHONPATH=str(tmp_path / "code")))
    assert result.returncode == 0, result.stderr[-2000:]
    assert torch.load(tmp_path / "t.pth", weights_only=True)["arch"] == f"{MODULE}:make_net"
    model = slimtune.load(tmp_path / "t.pth", factory=nets.make_net)
    assert model.num_classes == 10


def _small_start(arch: str, path: Path) -> nn.Module:
    """A pruned ``arch`` (fast to prune again) with fresh random γ, saved at ``path``."""
    torch.manual_seed(0)
    full = randomize(new_model(arch, 10), seed=1)
    small = randomize(engine_prune(full, 0.7, scope="prunable").model, seed=2)
    save_checkpoint(path, make_checkpoint(small))
    return small


@pytest.mark.slow  # builds every registered architecture at full width once (~1 min)
@pytest.mark.parametrize("arch", [*ARCHS, "torchvision:resnet18"])
def test_the_api_prunes_as_the_command_line_does(arch, tmp_path):
    _small_start(arch, tmp_path / "start.pth")
    result = run_cli("prune", "--checkpoint", "start.pth", "--ratio", "0.4", "--no-eval",
                     "--cpu", "--output", "cli.pth", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    pruned, report = slimtune.prune(slimtune.load(tmp_path / "start.pth"), ratio=0.4)
    cli = load_checkpoint(tmp_path / "cli.pth")
    assert cli["cfg"] == pruned.widths
    assert cli["prune"]["threshold"] == report.threshold
    assert cli["prune"]["params_after"] == report.params_after


def test_ignore_leaves_layers_whole_and_budgets_are_met(nets):
    torch.manual_seed(0)
    model = _gammas(nets.TinyNet(num_classes=10))
    pruned, _ = slimtune.prune(model, ratio=0.6, ignore=["stem.0", model.fc])
    assert pruned.stem[0].out_channels == 16  # the stem and the stream it feeds
    assert pruned.fc.in_features == 32  # the classifier's input: the head stays whole
    assert pruned.left[0].out_channels < 16
    small, report = slimtune.prune(model, target_params=8000, round_to=4)
    assert report.params_after <= 8000 < report.params_before
    assert all(m.out_channels % 4 == 0 for m in small.modules() if isinstance(m, nn.Conv2d)
               and m is not small.block.dw)
    counted = slimtune.profile(small)
    assert counted["params"] == report.params_after and counted["macs"] == report.macs_after


def test_sparsity_unscales_fp16_gradients_first(nets):
    """Under a GradScaler (and Accelerate's, which is one) the L1 term is added to unscaled
    gradients: the result equals the fp32 loop's, not the term divided by the scale."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    grads = []
    for scaled in (False, True):
        torch.manual_seed(1)
        model = _gammas(nets.TinyNet(10))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, enabled=scaled)
        reg = slimtune.Sparsity(model, lam=1e-2, optimizer=opt, scaler=scaler)
        scaler.scale(model(x).logsumexp(1).mean()).backward()
        reg.step()
        grads.append(model.stem[1].weight.grad.clone())
        scaler.step(opt)  # already unscaled: not divided again
        scaler.update()
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)

    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(1)
    model = _gammas(nets.TinyNet(10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    reg = slimtune.Sparsity(model, lam=1e-2, accelerator=accelerator, optimizer=opt)
    accelerator.backward(model(x).logsumexp(1).mean())
    reg.step()
    assert torch.allclose(model.stem[1].weight.grad, grads[0], rtol=1e-4, atol=1e-6)
    assert reg.penalty() > 0


def test_evaluate_and_finetune_in_one_process(nets):
    torch.manual_seed(0)
    data = slimtune.dataset("synthetic", image_size=16, synthetic_train=60, synthetic_test=30)
    model = _gammas(nets.TinyNet(data.num_classes))
    teacher = _gammas(nets.TinyNet(data.num_classes), seed=3).eval()
    pruned, _ = slimtune.prune(model, ratio=0.3)
    pruned, history = slimtune.finetune(pruned, data.train, data.test, epochs=2, lr=1e-3,
                                        batch_size=20, teacher=teacher)
    # the CLI's schedule: ÷10 at epochs ⌊2·0.5⌋ and ⌊2·0.75⌋, both the second
    assert history["lr"] == pytest.approx([1e-3, 1e-5]) and len(history["test_acc"]) == 2
    metrics = slimtune.evaluate(pruned, data.test, batch_size=7)
    assert metrics["total"] == 30 and metrics["accuracy"] == max(history["test_acc"])


@pytest.mark.parametrize("call, message", [
    (lambda m: slimtune.prune(m, ratio=1.5), r"^ratio 1\.5 is outside \(0, 1\)"),
    (lambda m: slimtune.prune(m), r"^give one of ratio, target_params or target_macs"),
    (lambda m: slimtune.prune(m, ratio=0.5, target_macs=10), r"give one of ratio, target_par"),
    (lambda m: slimtune.prune(m, ratio=0.5, scope="some"), r"^scope 'some'"),
    (lambda m: slimtune.prune(m, ratio=0.5, ignore=["nope"]), r"^ignore 'nope' is not a layer"),
    (lambda m: slimtune.prune(m, ratio=0.5, round_to=0), r"^round_to 0"),
    (lambda m: slimtune.prune(m, target_params=-3), r"^target_params -3 is not a positive"),
    (lambda m: slimtune.Sparsity(m, lam=-1), r"^lam -1 is not a finite number"),
    (lambda m: slimtune.Sparsity(m, scaler=object()), r"^optimizer is needed"),
    (lambda m: slimtune.profile(m, input_size=0), r"^input_size 0 is not an integer"),
    (lambda m: slimtune.save(m, "x.pth", factory="os:system"),
     r"^factory 'os:system' names Python's standard library"),
    (lambda m: slimtune.load("x.pth", factory="../x:y"), r"^factory '\.\./x:y' is not a module"),
    (lambda m: slimtune.finetune(m, [], epochs=0), r"^epochs 0 is not a positive int"),
], ids=lambda v: "" if callable(v) else v[:28])
def test_errors_name_the_parameter_never_a_flag(nets, call, message):
    with pytest.raises(ValueError, match=message) as info:
        call(nets.TinyNet(10))
    assert "--" not in str(info.value)


def test_type_errors_name_the_parameter():
    with pytest.raises(TypeError, match=r"^model must be a torch\.nn\.Module; got str"):
        slimtune.prune("resnet18", ratio=0.5)
    with pytest.raises(TypeError, match=r"^model must be a torch\.nn\.Module"):
        slimtune.Sparsity([1, 2])


def test_slimtunes_own_models_load_and_round_trip(tmp_path):
    model = slimtune.create_model("resnet18", num_classes=10)
    pruned, report = slimtune.prune(randomize(model), ratio=0.5)
    slimtune.save(pruned, tmp_path / "r.safetensors")
    back = slimtune.load(tmp_path / "r.safetensors").eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(back(x), pruned.eval()(x))
    assert back.prune_record["threshold"] == report.threshold


DOC = Path(__file__).resolve().parent.parent / "docs" / "python.md"


def test_docs_python_md_covers_every_public_name():
    text = DOC.read_text()
    missing = [name for name in slimtune.__all__ if f"`{name}" not in text]
    assert not missing, f"docs/python.md does not show {missing}"


def test_every_python_block_of_docs_python_md_runs(tmp_path, monkeypatch):
    """The page's ```python blocks, in order, in one namespace, as a script runs them."""
    blocks = re.findall(r"^```python\n(.*?)^```$", DOC.read_text(), re.S | re.M)
    assert len(blocks) >= 10
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__main__"}
    for i, block in enumerate(blocks, 1):
        exec(compile(block, f"docs/python.md, python block {i}", "exec"), namespace)
    assert (tmp_path / "mynet_slim.pth").is_file()
    assert torch.load(tmp_path / "mynet_slim.pth", weights_only=True)["arch"] == "__main__:MyNet"

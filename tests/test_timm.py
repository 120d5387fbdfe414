"""timm CNNs (``--arch timm:NAME``), graphs traced at the run's size, and ``train --init`` from
published weights (issue 22, §2 timm and §3).

The timm matrix: each family builds, takes a sparsity step, prunes 50 %, runs, saves, loads
with equal outputs and exports to ONNX with ONNX Runtime's outputs within 1e-4.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from tests.helpers import FAST, run_cli
from trainer.errors import ConfigError
from trainer.files.checkpoint import (
    build_model,
    load_checkpoint,
    make_checkpoint,
    save_checkpoint,
)
from trainer.models.build import family, new_model
from trainer.models.family import count_params
from trainer.prune.engine import prune
from trainer.train.loop import add_sparsity_grad

timm = pytest.importorskip("timm")

SIZE, CLASSES = 32, 5  # px, classes: the smallest inputs every family below runs at

# (timm name, what it stands for). Each builds, steps, prunes, saves, loads and exports.
MATRIX = [
    ("resnet18", "ResNet"),
    ("seresnet18", "SE-ResNet"),
    ("resnext26ts", "ResNeXt (its grouped convs' channels are kept whole)"),
    ("efficientnet_b0", "EfficientNet"),
    ("mobilenetv3_small_050", "MobileNetV3"),
    ("regnetx_002", "RegNet (its grouped convs' channels are kept whole)"),
    ("densenet121", "DenseNet"),
    ("dla34", "DLA"),
    ("ghostnet_100", "GhostNet (rerooted at each ghost module's primary conv)"),
    ("mixnet_s", "MixNet"),
    ("lcnet_050", "LCNet"),
]
HEAVY = {"densenet121", "ghostnet_100", "mixnet_s"}  # over 5 s each on 2 busy cores


def _randomized(model: nn.Module, seed: int, size: int = SIZE) -> nn.Module:
    """Distinct γ (pruning meets no ties), then the statistics of :func:`_calibrated`."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=gen) + 0.05)
    return _calibrated(model, seed, size)


def _calibrated(model: nn.Module, seed: int, size: int = SIZE) -> nn.Module:
    """BatchNorm statistics of what the layers compute (as prune --bn-recalibrate does), so
    outputs are of order 1 and 1e-4 is a real bound: a few train-mode batches."""
    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # a cumulative average over the batches below
        model.train()
        for _ in range(3):
            model(torch.randn(4, 3, size, size, generator=gen))
    for bn in bns:  # a channel constant on these few batches (var ~0) would scale float
        bn.momentum = 0.1  # noise up to 1/sqrt(eps) = 316x per layer: floored at 0.1
        bn.running_var.clamp_(min=0.1)
    return model.eval()


def _sparsity_step(model: nn.Module) -> None:
    """One training step with the L1 penalty on γ, as train's loop takes it."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(2, 3, SIZE, SIZE), torch.tensor([0, 1])
    model.train()
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    before = [m.weight.grad.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    add_sparsity_grad(model, 1e-2)
    after = [m.weight.grad for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))  # the penalty is in
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # batch 2 of random weights: huge grads
    opt.step()


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY
                                  else n for n, _ in MATRIX])
def test_a_timm_family_is_slimmed_end_to_end(tmp_path, name):
    from trainer.files.export import export_onnx, onnx_session

    torch.manual_seed(0)
    model = new_model(f"timm:{name}", CLASSES, input_size=SIZE)
    _sparsity_step(model)
    model = _randomized(model, seed=1).eval()
    before = count_params(model)
    result = prune(model, 0.5)
    pruned = _calibrated(result.model, seed=2)
    assert count_params(pruned) < before
    assert result.record.params_after == count_params(pruned)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = pruned(x)
    assert out.shape == (2, CLASSES) and torch.isfinite(out).all()

    path = tmp_path / "p.pth"
    save_checkpoint(path, make_checkpoint(pruned, config={"image_size": SIZE}))
    ckpt = load_checkpoint(path)
    assert ckpt["arch"] == f"timm:{name}" and ckpt["cfg"]
    loaded = build_model(ckpt).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), out)

    export_onnx(loaded, tmp_path / "p.onnx", input_size=SIZE)
    session = onnx_session(tmp_path / "p.onnx")
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert (torch.from_numpy(got) - out).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name, reason", [
    ("convnext_atto", r"has no BatchNorm2d layers \(its norms: LayerNorm2d"),
    ("rexnet_100", r"cannot be slimmed: its blocks add the shortcut into a slice"),
    ("not_a_model_xyz", r"'not_a_model_xyz' is not a timm model"),
])
def test_a_timm_model_network_slimming_cannot_prune_is_refused(name, reason):
    with pytest.raises(ConfigError, match=reason):
        new_model(f"timm:{name}", CLASSES)


def test_a_timm_model_torch_pruning_cannot_trace_is_refused_before_training():
    model = new_model("timm:cs3darknet_s", CLASSES)
    with pytest.raises(ConfigError, match=r"timm:cs3darknet_s: Torch-Pruning cannot trace it "
                                          r"at 32x32 \(TypeError"):
        family("timm:cs3darknet_s").check_prunable(model)


@pytest.mark.slow  # Inception-v3 traced three times (~8 s)
def test_the_graph_is_traced_at_the_runs_size_and_a_checkpoint_at_its_own(tmp_path):
    """Inception-v3 runs from 75 px up: built for 80 px it traces and prunes, and its pruned
    file (trained at 80) rebuilds by replaying its history at 80; at 32 px it cannot."""
    with pytest.raises(ConfigError, match=r"cannot trace it at 32x32"):
        family("timm:inception_v3").check_prunable(new_model("timm:inception_v3", CLASSES))
    model = _randomized(new_model("timm:inception_v3", CLASSES, input_size=80), seed=3,
                        size=80)
    pruned = prune(model.eval(), 0.5).model
    assert pruned.trace_size == 80 and pruned.widths
    save_checkpoint(tmp_path / "p.pth", make_checkpoint(pruned, config={"image_size": 80}))
    loaded = build_model(load_checkpoint(tmp_path / "p.pth"))
    assert loaded.trace_size == 80 and count_params(loaded) == count_params(pruned)


# ---------------------------------------------------------------- train --init FILE


def _torchvision_file(tmp_path, kind: str) -> Path:
    """A plain torchvision resnet18 state_dict of 1000 classes, as published (random weights:
    no download), saved as torch.save does, with ``module.`` prefixes, or as safetensors."""
    torch.manual_seed(0)
    state = torchvision.models.resnet18(num_classes=1000).state_dict()
    if kind == "safetensors":
        path = tmp_path / "resnet18.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        return path
    if kind == "module":
        state = {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    return path


INIT = ["train", "--dataset", "synthetic", "--synthetic-train", "40", "--synthetic-test", "20",
        "--image-size", "16", "--epochs", "1", *FAST, "--arch", "torchvision:resnet18"]


@pytest.mark.parametrize("kind", ["pth", pytest.param("module", marks=pytest.mark.slow),
                                  pytest.param("safetensors", marks=pytest.mark.slow)])
def test_init_from_a_published_state_dict_replaces_the_classifier(tmp_path, kind):
    src = _torchvision_file(tmp_path, kind)
    res = run_cli(*INIT, "--init", str(src), "--output", "t.pth", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (f"--init {src}: its classifier fc has 1000 classes and the synthetic data 10; "
            "replaced fc by a freshly initialised one") in " ".join(res.stdout.split())
    ckpt = load_checkpoint(tmp_path / "t.pth")
    assert ckpt["arch"] == "torchvision:resnet18" and ckpt["num_classes"] == 10
    assert ckpt["state_dict"]["fc.weight"].shape == (10, 512)


def test_init_keeps_the_files_weights_but_the_classifier(tmp_path):
    from trainer.files.pretrained import initial_model

    src = _torchvision_file(tmp_path, "pth")
    state = torch.load(src, weights_only=True)
    torch.manual_seed(1)
    model, replaced = initial_model(src, "torchvision:resnet18", 10, 16)
    assert replaced == ("fc", 1000)
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items() if not k.startswith("fc."))
    assert own["fc.weight"].shape == (10, 512) and own["fc.weight"].std() > 0
    assert not torch.equal(own["fc.weight"], state["fc.weight"][:10])  # new, not the file's


def test_init_with_another_layer_that_does_not_fit_names_it(tmp_path):
    torch.manual_seed(0)
    state = torchvision.models.resnet18(num_classes=1000).state_dict()
    state["layer2.0.conv1.weight"] = torch.zeros(64, 64, 3, 3)  # not resnet18's 128
    torch.save(state, tmp_path / "odd.pth")
    res = run_cli(*INIT, "--init", "odd.pth", "--output", "t.pth", cwd=tmp_path)
    assert res.returncode == 2, res.stdout
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error:")
    assert "layer2.0.conv1.weight has shape (64, 64, 3, 3)" in res.stderr
    assert not (tmp_path / "t.pth").exists()


# ---------------------------------------------------------------- the CLI on a timm model


@pytest.mark.slow  # five commands on one small timm model (~25 s on 2 busy cores)
def test_every_command_rebuilds_a_timm_checkpoint_from_its_name(tmp_path):
    data = ["--dataset", "synthetic", "--synthetic-train", "20", "--synthetic-test", "10",
            "--image-size", "32", *FAST]
    res = run_cli("train", "--arch", "timm:mobilenetv3_small_050", "--epochs", "1", *data,
                  "--output", "t.pth", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    res = run_cli("prune", "--checkpoint", "t.pth", "--ratio", "0.5", "--no-eval", "--cpu",
                  "--output", "p.pth", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    ckpt = load_checkpoint(tmp_path / "p.pth")
    assert ckpt["arch"] == "timm:mobilenetv3_small_050" and ckpt["cfg"]
    params = count_params(build_model(ckpt))
    res = run_cli("info", "p.pth", cwd=tmp_path)
    assert res.returncode == 0 and "timm:mobilenetv3_small_050" in res.stdout, res.stderr
    assert f"{params:,}" in res.stdout
    res = run_cli("evaluate", "p.pth", *FAST, cwd=tmp_path)  # the data as it was trained
    assert res.returncode == 0 and "acc" in res.stdout, res.stderr
    res = run_cli("profile", "p.pth", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.splitlines()[-1])["params"] == params
    res = run_cli("export", "p.pth", "--format", "onnx", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert list(tmp_path.glob("p*.onnx"))

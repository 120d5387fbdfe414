"""Every architecture slimtune slims (trainer.config.archs / models and the families): the unpruned
counts of the official code, forward at 32x32, and the pruning equivalences the lab model has
(keep every channel: same outputs; remove channels whose γ and β are zero: same outputs; save
-> load: same outputs; thop's params = the state_dict's)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.helpers import cli_text, randomize
from trainer.errors import CheckpointError, UserError
from trainer.files.checkpoint import build_model, load_checkpoint, make_checkpoint, save_checkpoint
from trainer.models.build import new_model
from trainer.models.family import batchnorms, count_params
from trainer.prune.engine import apply_masks, prune, units_of

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# arch -> parameters of the unpruned model with 10 classes (the official code's layouts; VGG-19
# is the paper's 20.04M, ResNet-164 its 1.70M; DenseNet-40 counts 1.06M here and in the
# official code, against 1.02M in the paper's Table 1).
PARAMS = {
    "resnet18": 11_172_170, "resnet34": 21_280_330, "resnet50": 23_513_162,
    "resnet101": 42_505_290, "vgg11": 9_228_362, "vgg13": 9_413_066, "vgg16": 14_724_042,
    "vgg19": 20_035_018, "resnet164": 1_703_258, "densenet40": 1_059_298,
    "torchvision:resnet18": 11_181_642, "torchvision:mobilenet_v2": 2_236_682,
    "torchvision:vgg11_bn": 128_812_810,
}
HEAVY = {"resnet101", "torchvision:vgg11_bn", "resnet164", "resnet34"}  # slow on 2 cores
ARCHS = [pytest.param(a, marks=pytest.mark.slow) if a in HEAVY else a for a in PARAMS]
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float32 rounding, relative to the outputs' size (deep nets: large values)."""
    return bool((a - b).abs().max() <= 1e-5 * b.abs().max().clamp(min=1.0))


def outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(X)


@pytest.mark.parametrize("arch", ARCHS)
def test_unpruned_params_forward_and_thop(arch):
    import thop

    model = new_model(arch, 10)
    assert count_params(model) == PARAMS[arch]
    assert outputs(model).shape == (2, 10)
    macs, params = thop.profile(copy.deepcopy(model).eval(), inputs=(X[:1],), verbose=False)
    assert int(params) == sum(v.numel() for k, v in model.state_dict().items()
                              if k in dict(model.named_parameters()))
    assert macs > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_keeping_every_channel_reproduces_the_outputs(arch):
    model = randomize(new_model(arch, 10))
    keep = [torch.ones(len(u.score), dtype=torch.bool) for u in units_of(model)]
    same = apply_masks(model, keep)
    assert count_params(same) == count_params(model)
    assert torch.equal(outputs(same), outputs(model))


def _zero_removed(model: nn.Module, masks: list[torch.Tensor]) -> None:
    """γ = β = 0 on the channels the masks remove, in every BatchNorm they reach."""
    for bn, channels in removed_bn_channels(model, masks):
        with torch.no_grad():
            bn.weight[channels] = 0.0
            bn.bias[channels] = 0.0


def removed_bn_channels(model: nn.Module, masks: list[torch.Tensor]):
    """(BatchNorm, its channel indices) for each channel a unit mask removes."""
    if model.arch.startswith("torchvision:"):
        from trainer.models.graph import _bn_items, _groups, graph

        dg = graph(model)
        groups = [(name, list(_bn_items(dg, g))) for name, g in _groups(model, dg)]
        for (unit, items), mask in zip(groups, masks):
            removed = set(torch.nonzero(~mask).flatten().tolist())
            for bn, idxs, roots in items:
                yield bn, [i for i, r in zip(idxs, roots) if r in removed]
        return
    from trainer.models.family import live_channels

    modules = dict(model.named_modules())
    for unit, mask in zip(units_of(model), masks):
        bn = modules[unit.name]
        parent = unit.name.rsplit(".", 1)[0] + "." if "." in unit.name else ""
        select = modules.get(parent + "select") if unit.name.endswith(("bn1", "bn")) else None
        yield bn, live_channels(select, bn)[~mask]


@pytest.mark.parametrize("arch", ARCHS)
def test_pruning_channels_whose_gamma_and_beta_are_zero_keeps_the_outputs(arch):
    model = randomize(new_model(arch, 10), seed=1)
    gen = torch.Generator().manual_seed(2)
    masks = []
    for unit in units_of(model):
        mask = torch.ones(len(unit.score), dtype=torch.bool)
        if unit.prunable and len(mask) > 2:
            mask[torch.randperm(len(mask), generator=gen)[:len(mask) // 3]] = False
        masks.append(mask)
    _zero_removed(model, masks)
    smaller = apply_masks(model, masks)
    assert count_params(smaller) < count_params(model)
    assert close(outputs(smaller), outputs(model))


@pytest.mark.parametrize("arch", ARCHS)
def test_a_pruned_model_saves_and_loads_as_itself(arch, tmp_path):
    model = randomize(new_model(arch, 10), seed=3)
    result = prune(model, 0.5, scope="prunable")
    save_checkpoint(tmp_path / "p.pth", make_checkpoint(result.model, prune={"ratio": 0.5}))
    raw = torch.load(tmp_path / "p.pth", weights_only=True)
    assert raw["arch"] == arch and raw["cfg"] == result.model.widths
    back = build_model(load_checkpoint(tmp_path / "p.pth"))
    assert count_params(back) == result.record.params_after < result.record.params_before
    assert torch.equal(outputs(back), outputs(result.model))


# ---------------------------------------------------------------- the official code's files


def official_vgg_state(cfg: list, classes: int = 10) -> dict[str, torch.Tensor]:
    """A state_dict with the network-slimming code's VGG names, built from its cfg alone."""
    state, j, cin = {}, 0, 3
    for v in cfg:
        if v == "M":
            j += 1
            continue
        state[f"feature.{j}.weight"] = torch.randn(v, cin, 3, 3) * 0.1
        for part, init in (("weight", 0.5), ("bias", 0.0), ("running_mean", 0.0),
                           ("running_var", 1.0)):
            state[f"feature.{j + 1}.{part}"] = torch.full((v,), init)
        state[f"feature.{j + 1}.num_batches_tracked"] = torch.tensor(0)
        j, cin = j + 3, v
    state["classifier.weight"] = torch.randn(classes, cin) * 0.01
    state["classifier.bias"] = torch.zeros(classes)
    return state


def test_an_official_vgg19_prune_file_loads(tmp_path):
    cfg = [32, 64, "M", 128, 100, "M", 256, 200, 256, 128, "M", 256, 64, 32, 16, "M",
           8, 8, 16, 512]
    torch.save({"cfg": cfg, "state_dict": official_vgg_state(cfg)}, tmp_path / "vgg.pth")
    ckpt = load_checkpoint(tmp_path / "vgg.pth")  # no arch: its keys say vgg19
    assert ckpt["arch"] == "vgg19" and ckpt["cfg"] == cfg and ckpt["num_classes"] == 10
    assert outputs(build_model(ckpt)).shape == (2, 10)


def test_vgg_prune_gives_the_cfg_of_the_official_vggprune(tmp_path):
    """vggprune.py: sort the |γ| of every BN, threshold at int(total * percent), keep > it."""
    model = randomize(new_model("vgg19", 10), seed=4)
    gammas = torch.cat([bn.weight.detach().abs() for _, bn in batchnorms(model)])
    threshold = torch.sort(gammas).values[int(len(gammas) * 0.7)]
    counts = iter(int((bn.weight.detach().abs() > threshold).sum()) for _, bn in batchnorms(model))
    official = [v if v == "M" else next(counts) for v in model.widths]
    assert prune(model, 0.7).model.widths == official


def official_resnet164_state(cfg: list[int], classes: int = 10) -> dict[str, torch.Tensor]:
    """A state_dict with the network-slimming code's ResNet-164 names, from its cfg alone."""
    def bn(prefix: str, n: int) -> None:
        for part, init in (("weight", 0.5), ("bias", 0.0), ("running_mean", 0.0),
                           ("running_var", 1.0)):
            state[f"{prefix}.{part}"] = torch.full((n,), init)
        state[f"{prefix}.num_batches_tracked"] = torch.tensor(0)

    state = {"conv1.weight": torch.randn(16, 3, 3, 3) * 0.1}
    inplanes, i = 16, 0
    for s, planes in enumerate((16, 32, 64), start=1):
        for b in range(18):
            p = f"layer{s}.{b}"
            bn(f"{p}.bn1", inplanes)
            state[f"{p}.select.indexes"] = torch.ones(inplanes)
            state[f"{p}.select.indexes"][cfg[i]:] = 0.0  # keeps the first cfg[i] channels
            state[f"{p}.conv1.weight"] = torch.randn(cfg[i + 1], cfg[i], 1, 1) * 0.1
            bn(f"{p}.bn2", cfg[i + 1])
            state[f"{p}.conv2.weight"] = torch.randn(cfg[i + 2], cfg[i + 1], 3, 3) * 0.1
            bn(f"{p}.bn3", cfg[i + 2])
            state[f"{p}.conv3.weight"] = torch.randn(planes * 4, cfg[i + 2], 1, 1) * 0.1
            if b == 0:
                state[f"{p}.downsample.0.weight"] = torch.randn(planes * 4, inplanes, 1, 1)
            inplanes, i = planes * 4, i + 3
    bn("bn", 256)
    state["select.indexes"] = torch.ones(256)
    state["select.indexes"][cfg[-1]:] = 0.0
    state["fc.weight"] = torch.randn(classes, cfg[-1]) * 0.01
    state["fc.bias"] = torch.zeros(classes)
    return state


@pytest.mark.slow
def test_an_official_resnet164_prune_file_loads(tmp_path):
    full = new_model("resnet164", 10).widths
    cfg = [max(1, w // 3) for w in full]
    torch.save({"cfg": cfg, "state_dict": official_resnet164_state(cfg)}, tmp_path / "r.pth")
    ckpt = load_checkpoint(tmp_path / "r.pth")
    assert ckpt["arch"] == "resnet164" and ckpt["cfg"] == cfg
    model = build_model(ckpt)
    assert model.fc.in_features == cfg[-1] and outputs(model).shape == (2, 10)


def test_an_official_main_py_checkpoint_loads(tmp_path):
    """main.py saves {epoch, state_dict, best_prec1, optimizer}: no cfg, no arch."""
    model = randomize(new_model("vgg16", 10), seed=5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.save({"epoch": 160, "state_dict": model.state_dict(), "best_prec1": 0.9321,
                "optimizer": optimizer.state_dict()}, tmp_path / "model_best.pth.tar")
    ckpt = load_checkpoint(tmp_path / "model_best.pth.tar")
    assert ckpt["arch"] == "vgg16" and ckpt["cfg"] == model.widths
    assert torch.equal(outputs(build_model(ckpt)), outputs(model))


# ---------------------------------------------------------------- refusals


def test_widths_that_do_not_match_the_weights_name_the_layer(tmp_path):
    cfg = list(new_model("vgg11", 10).widths)
    state = official_vgg_state(cfg)
    cfg[4] = 100  # the 3rd conv (feature.8) has 256 channels in the weights
    torch.save({"arch": "vgg11", "cfg": cfg, "state_dict": state}, tmp_path / "v.pth")
    with pytest.raises(CheckpointError, match=r"feature\.8\.weight has shape \(256, 128, 3, 3\) "
                                              r"but the cfg \(cfg\[4\]=100\) expects"):
        load_checkpoint(tmp_path / "v.pth")


@pytest.mark.parametrize("arch, needle", [
    ("alexnet", "--arch 'alexnet' is unknown; use one of resnet50"),
    ("torchvision:fasterrcnn_resnet50_fpn", "is not a torchvision classification model"),
    ("torchvision:vit_b_16", "has no BatchNorm2d layers"),
])
def test_an_unknown_arch_is_one_line(arch, needle):
    with pytest.raises(UserError) as err:
        new_model(arch, 10)
    assert needle in cli_text(err.value) and "\n" not in str(err.value)

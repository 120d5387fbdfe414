"""Channel criteria and allocations of the prune engine (trainer.prune.criteria, engine): bn +
global is the old prune bit for bit; l1 keeps each unit's largest normalised filter norms, as a
direct computation here finds them; random follows its seed; taylor is |activation × gradient|
and runs on the synthetic set; uniform removes ⌊r·C⌋ of every layer and, with a budget, is the
least-pruned uniform model within it."""

from __future__ import annotations

import copy
import hashlib
import json
import math

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import REPO, randomize, small_cfg
from trainer.commands.worker import run_worker
from trainer.config.settings import RunConfig
from trainer.errors import DataError, ParamError
from trainer.files.checkpoint import build_model, load_checkpoint, make_checkpoint, save_checkpoint
from trainer.models.build import family, new_model
from trainer.models.family import batchnorms
from trainer.prune.criteria import taylor_scores
from trainer.prune.engine import (
    model_size,
    prune,
    prune_to_budget,
    removed_count,
    uniform_masks,
    uniform_steps,
    units_of,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def model_of(arch: str) -> torch.nn.Module:
    """A seeded model with random BN affine params and running stats (the lab's ResNet-50 at
    8 channels inside each block: fast)."""
    torch.manual_seed(0)
    model = new_model("resnet50", 10, small_cfg(8)) if arch == "resnet50" else new_model(arch, 10)
    return randomize(model, seed=3)


# ---------------------------------------------------------------- bn + global = today's prune

# The outputs of prune / prune_to_budget before criteria existed, recorded from that code
# (tests/prune_bn_reference.json: widths, a digest of the pruned state_dict and of the masks,
# the record's figures).
REFERENCE = json.loads((REPO / "tests" / "prune_bn_reference.json").read_text())
CASES = [
    ("resnet50", {"ratio": 0.5}), ("resnet50", {"ratio": 0.7, "scope": "prunable"}),
    ("resnet50", {"ratio": 0.9, "min_channels": 3, "round_to": 2}),
    ("resnet50", {"target_params": 3_000_000}),
    ("vgg11", {"ratio": 0.6}), ("vgg11", {"ratio": 0.3, "round_to": 8}),
    ("vgg11", {"target_macs": 60_000_000}),
    ("densenet40", {"ratio": 0.5}),
    ("torchvision:resnet18", {"ratio": 0.5, "scope": "prunable"}),
]


def _digest(result) -> dict:
    state = hashlib.sha256()
    for key, value in sorted(result.model.state_dict().items()):
        state.update(key.encode())
        state.update(value.detach().cpu().contiguous().numpy().tobytes())
    masks = torch.cat([m.cpu().flatten() for m in result.masks]).numpy().tobytes()
    rec = result.record.to_dict()
    keys = ("ratio", "threshold", "scope", "min_channels", "round_to", "budget", "params_before",
            "params_after", "removed_fraction", "ties", "min_channels_kept", "stages")
    return {"widths": result.model.widths, "state": state.hexdigest(),
            "masks": hashlib.sha256(masks).hexdigest(), "record": {k: rec[k] for k in keys}}


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{a}-{k}" for a, k in CASES])
def test_bn_global_is_the_old_prune_bit_for_bit(case):
    arch, kwargs = CASES[case]
    kwargs = dict(kwargs, criterion="bn", allocation="global")
    budget = next((k for k in ("target_params", "target_macs") if k in kwargs), None)
    if budget:
        result = prune_to_budget(model_of(arch), kwargs.pop(budget), budget[len("target_"):],
                                 **kwargs)
    else:
        result = prune(model_of(arch), kwargs.pop("ratio"), **kwargs)
    want = REFERENCE[case]
    assert want["arch"] == arch
    got = json.loads(json.dumps(_digest(result)))  # tuples as lists, as the file has them
    assert got == {k: v for k, v in want.items() if k != "arch"}
    assert result.record.criterion == "bn" and result.record.allocation == "global"


# ---------------------------------------------------------------- l1 / l2: filter norms


def _feeding_conv(arch: str, unit: str) -> str:
    """The conv whose output filters make a unit's channels, named here independently."""
    if arch == "resnet50":  # bn1 <- conv1, layer1.0.bn2 <- layer1.0.conv2
        head, _, bn = unit.rpartition(".")
        return f"{head}.conv{bn[2:]}" if head else "conv1"
    if arch.startswith("vgg"):  # feature.(j+1) is the BN of the conv feature.j
        return f"feature.{int(unit.split('.')[1]) - 1}"
    return unit  # a dependency-graph group: named by its root conv


def _expected_masks(model, arch: str, ratio: float, scope: str, p: int = 1):
    """Per unit: the channels whose filter norm, divided by the mean of its unit's, lies
    strictly above the value at position ⌊N·ratio⌋ of all N in scope (at least one kept)."""
    units = units_of(model)  # names and which are pruned; the scores are computed here
    scores = []
    for unit in units:
        w = model.get_submodule(_feeding_conv(arch, unit.name)).weight.detach()
        norms = w.abs().pow(p).flatten(1).sum(1).pow(1 / p)
        scores.append(norms / norms.mean())
    ranked = torch.sort(torch.cat([s for u, s in zip(units, scores)
                                   if scope == "all" or u.prunable])).values
    threshold = ranked[int(len(ranked) * ratio)]
    masks = []
    for unit, s in zip(units, scores):
        mask = s > threshold if unit.prunable else torch.ones(len(s), dtype=torch.bool)
        if not mask.any():
            mask[s.argmax()] = True
        masks.append(mask)
    return units, masks


@pytest.mark.parametrize("arch, scope", [("resnet50", "all"), ("vgg11", "all"),
                                         ("torchvision:resnet18", "prunable")])
def test_l1_on_a_checkpoint_keeps_the_largest_normalised_filter_norms(arch, scope, tmp_path,
                                                                     monkeypatch):
    """prune --criterion l1 on a checkpoint: every unit keeps the channels a direct computation
    of the normalised filter norms picks, and the pruned file has those widths."""
    monkeypatch.chdir(tmp_path)  # the histogram goes to plots/
    model = model_of(arch)
    src = tmp_path / "sparse.pth"
    save_checkpoint(src, make_checkpoint(model))
    out = tmp_path / "p.pth"
    run = RunConfig(command="prune", checkpoint=str(src), output=str(out), ratio=0.6,
                    criterion="l1", scope=scope, eval=False, cpu=True, num_workers=0)
    assert run_worker(run) == 0
    units, masks = _expected_masks(model, arch, 0.6, scope)
    assert sum(int(m.sum()) for m in masks) < sum(len(m) for m in masks)  # something went
    result = prune(model, 0.6, criterion="l1", scope=scope)
    pruned = build_model(load_checkpoint(out))
    for unit, mask, got in zip(units, masks, result.masks, strict=True):
        assert torch.equal(got, mask), unit.name  # the same channels
        conv = pruned.get_submodule(_feeding_conv(arch, unit.name))
        assert conv.out_channels == int(mask.sum()), unit.name  # the file's width
    record = load_checkpoint(out)["prune"]
    assert record["criterion"] == "l1" and record["allocation"] == "global"


def test_l1_keeps_exactly_the_filters_of_the_largest_norms_and_l2_differs():
    """The kept output filters of each pruned conv are the original ones of the largest
    normalised norms (resnet50: a conv's input channels are its predecessor's kept ones)."""
    model = model_of("resnet50")
    result = prune(model, 0.5, criterion="l1", scope="prunable")
    units, masks = _expected_masks(model, "resnet50", 0.5, "prunable")
    got = {u.name: m for u, m in zip(result.units, result.masks)}
    for unit, mask in zip(units, masks):
        assert torch.equal(got[unit.name], mask), unit.name
    block, old = result.model.layer2[1], model.layer2[1]
    m1, m2 = got["layer2.1.bn1"], got["layer2.1.bn2"]
    assert torch.equal(block.conv1.weight, old.conv1.weight[m1])
    assert torch.equal(block.conv2.weight, old.conv2.weight[m2][:, m1])
    l2 = prune(model, 0.5, criterion="l2", scope="prunable")
    _, masks2 = _expected_masks(model, "resnet50", 0.5, "prunable", p=2)
    assert all(torch.equal(a, b) for a, b in zip(l2.masks, masks2))


def test_normalised_scores_have_mean_one_per_unit_and_bn_is_raw_gamma():
    model = model_of("vgg11")
    for criterion in ("l1", "l2"):
        for unit in units_of(model, criterion):
            assert unit.score.mean().item() == pytest.approx(1.0, rel=1e-5)
    raw = units_of(model, "bn")
    assert all(torch.equal(u.score, bn.weight.detach().abs()) for u, (_, bn)
               in zip(raw, batchnorms(model)))


# ---------------------------------------------------------------- random


def test_random_is_reproducible_by_seed_and_changes_with_it():
    model = model_of("resnet50")
    a = prune(model, 0.5, criterion="random", seed=7, scope="prunable")
    torch.manual_seed(123)  # the global generator does not matter
    torch.rand(1000)
    b = prune(model, 0.5, criterion="random", seed=7, scope="prunable")
    c = prune(model, 0.5, criterion="random", seed=8, scope="prunable")
    assert all(torch.equal(x, y) for x, y in zip(a.masks, b.masks))
    assert not all(torch.equal(x, y) for x, y in zip(a.masks, c.masks))
    assert torch.equal(a.model.layer3[0].conv2.weight, b.model.layer3[0].conv2.weight)
    scores = torch.cat([u.score for u in units_of(model, "random", seed=7)])
    assert 0 <= scores.min() and scores.max() < 1  # uniform in [0, 1): not normalised


# ---------------------------------------------------------------- taylor


def _batches(n: int, size: int = 32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, size, size, generator=gen),
             torch.randint(0, 10, (8,), generator=gen)) for _ in range(n)]


def test_taylor_is_activation_times_gradient_of_each_batchnorm_output():
    """|Σ a·∂L/∂a| over a batch (a: the BN's output, from a hook), averaged over batches, is
    what the criterion computes (as |γ·∂L/∂γ + β·∂L/∂β|); the model is left untouched."""
    model = model_of("vgg11")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = _batches(2)
    scores = taylor_scores(model, batches)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    expected = {name: torch.zeros(bn.num_features) for name, bn in batchnorms(model)}
    for x, y in batches:
        work = copy.deepcopy(model).train()
        outs = {}
        for name, bn in batchnorms(work):
            bn.register_forward_hook(lambda m, i, o, name=name: outs.__setitem__(name, o))
        loss = F.cross_entropy(work(x), y)
        grads = torch.autograd.grad(loss, list(outs.values()))
        for (name, a), g in zip(outs.items(), grads):
            expected[name] += (a * g).sum((0, 2, 3)).abs().detach() / len(batches)
    for name, value in expected.items():
        assert torch.allclose(scores[name], value, rtol=1e-4, atol=1e-9), name


def test_taylor_prune_runs_on_the_synthetic_set(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = randomize(new_model("resnet50", 10, small_cfg(4)), seed=1)
    src = tmp_path / "sparse.pth"
    save_checkpoint(src, make_checkpoint(model))
    out = tmp_path / "p.pth"
    run = RunConfig(command="prune", checkpoint=str(src), output=str(out), ratio=0.5,
                    criterion="taylor", taylor_batches=2, scope="prunable", dataset="synthetic",
                    image_size=32, synthetic_train=32, synthetic_test=16, batch_size=8,
                    bn_recalibrate=2, cpu=True, num_workers=0)
    assert run_worker(run) == 0
    record = load_checkpoint(out)["prune"]
    assert record["criterion"] == "taylor"
    assert record["removed_fraction"] == pytest.approx(0.5, abs=0.02)
    assert record["bn_recalibrate"] == 2 and record["acc_after_stale"] is not None
    assert "criterion taylor" in " ".join(capsys.readouterr().out.split())


def test_taylor_without_batches_or_data_is_refused(tmp_path):
    with pytest.raises(ParamError, match="taylor scores channels on training batches"):
        prune(model_of("vgg11"), 0.5, criterion="taylor")
    src = tmp_path / "sparse.pth"
    save_checkpoint(src, make_checkpoint(model_of("resnet50")))
    run = RunConfig(command="prune", checkpoint=str(src), output=str(tmp_path / "p.pth"),
                    ratio=0.5, criterion="taylor", eval=False, dataset="cifar10",
                    data_dir=str(tmp_path / "none"), download=False, cpu=True, num_workers=0)
    with pytest.raises(DataError, match="--criterion taylor scores channels on training"):
        run_worker(run)
    assert not (tmp_path / "p.pth").exists()


# ---------------------------------------------------------------- uniform allocation


@pytest.mark.parametrize("arch", ["resnet50", "vgg11"])
@pytest.mark.parametrize("ratio, floors", [(0.3, {}), (0.5, {"round_to": 4}),
                                           (0.9, {"min_channels": 3}), (0.77, {})])
def test_uniform_removes_floor_r_times_c_in_every_layer(arch, ratio, floors):
    model = model_of(arch)
    result = prune(model, ratio, allocation="uniform", criterion="l1", **floors)
    k, floor = floors.get("round_to", 1), floors.get("min_channels", 1)
    for unit, mask in zip(result.units, result.masks):
        c = len(unit.score)
        if not unit.prunable:
            assert mask.all()
            continue
        want = max(c - math.floor(ratio * c + 1e-9), floor)
        want = min(c, k * max(1, math.ceil(want / k))) if k > 1 else want
        assert int(mask.sum()) == want, (unit.name, c)
        if not mask.all():  # the kept are the best-scoring
            assert unit.score[mask].min() >= unit.score[~mask].max()
    assert result.record.allocation == "uniform" and result.record.threshold is None


def test_uniform_ratio_rounding_counts_exact_fractions():
    assert removed_count(1 / 49, 49) == 1 and removed_count(0.29, 100) == 29
    assert removed_count(0.5, 7) == 3


@pytest.mark.parametrize("kind, fraction", [("params", 0.6), ("macs", 0.45)])
def test_uniform_budget_is_the_least_pruned_uniform_model_within_it(kind, fraction):
    model = model_of("vgg11")
    fam = family(model.arch)
    target = int(fraction * model_size(model, kind))
    result = prune_to_budget(model, target, kind, allocation="uniform", round_to=4)
    assert result.record.budget["reached"] <= target
    units = units_of(model)
    steps = uniform_steps(units)
    chosen = steps.index(result.record.ratio)
    assert chosen > 0
    expected, _ = uniform_masks(units, result.record.ratio, round_to=4)
    assert all(torch.equal(a, b) for a, b in zip(expected, result.masks))
    less, _ = uniform_masks(units, steps[chosen - 1], round_to=4)  # the next less-pruned one
    assert model_size(fam.shape(model, less), kind) > target
    assert result.record.allocation == "uniform"


# ---------------------------------------------------------------- bad values


def test_unknown_criterion_or_allocation_names_the_parameter():
    with pytest.raises(ParamError, match="criterion 'l3': use bn, l1, l2, random or taylor"):
        prune(model_of("vgg11"), 0.5, criterion="l3")
    with pytest.raises(ParamError, match="allocation 'even': use global or uniform"):
        prune(model_of("vgg11"), 0.5, allocation="even")
    with pytest.raises(ParamError, match="ratio 1.0 is outside"):
        prune(model_of("vgg11"), 1.0, allocation="uniform")

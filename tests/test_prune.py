"""Network-slimming pruning (trainer.prune.engine) and the prune command
(trainer.commands.prune.cmd_prune)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tests.helpers import randomize, small_cfg
from trainer.commands.worker import run_worker
from trainer.config.settings import RunConfig
from trainer.errors import CheckpointError, ParamError
from trainer.files.checkpoint import build_model, load_checkpoint, make_checkpoint, save_checkpoint
from trainer.models.family import batchnorms, count_params
from trainer.models.resnet import ResNet50, prunable_indices
from trainer.prune.engine import (
    all_gammas,
    apply_masks,
    masks_of,
    prune,
    stage_summary,
    threshold_of,
    units_of,
)

DEAD = "layer3.2.bn1"  # the layer whose every γ is tiny


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def hand_set_model() -> ResNet50:
    """Width-4 model: prunable γ = ±[0.1, 0.2, 0.3, 0.4] per layer, except DEAD (1e-4..4e-4);
    the stem and every bn3 at γ = 1."""
    torch.manual_seed(0)
    model = ResNet50(widths=small_cfg(4))
    prunable = set(prunable_indices())
    with torch.no_grad():
        for i, (name, bn) in enumerate(batchnorms(model)):
            if i not in prunable:
                bn.weight.fill_(1.0)
            elif name == DEAD:
                bn.weight.copy_(torch.tensor([3e-4, -1e-4, 4e-4, 2e-4]))
            else:
                bn.weight.copy_(torch.tensor([0.1, -0.2, 0.3, -0.4]))
    return model


def kept(result_masks) -> dict[str, int]:
    names = [n for n, _ in batchnorms(ResNet50(widths=small_cfg(1)))]
    return {names[i]: int(result_masks[i].sum()) for i in prunable_indices()}


# ---------------------------------------------------------------- threshold and kept counts


def test_threshold_and_kept_counts_prunable_scope():
    model = hand_set_model()
    # 128 prunable channels sorted: 4 tiny, 31 x 0.1, 31 x 0.2, 31 x 0.3, 31 x 0.4
    assert len(all_gammas(model, "prunable")) == 128
    res = prune(model, 0.5, scope="prunable")  # position 64 -> 0.2
    assert res.record.threshold == pytest.approx(0.2)
    counts = kept(res.masks)
    # strictly above: the 0.2 channel goes too; 0.3 and 0.4 stay
    assert {k: v for k, v in counts.items() if k != DEAD} == {k: 2 for k in counts if k != DEAD}
    # the dead layer would be empty: --min-channels (1) keeps its largest-|γ| channel
    assert counts[DEAD] == 1 and res.record.min_channels_kept == [DEAD]
    dead_idx = [n for n, _ in batchnorms(model)].index(DEAD)
    assert res.masks[dead_idx].tolist() == [False, False, True, False]
    assert res.masks[dead_idx + 1].tolist() == [False, False, True, True]  # its bn2: 0.3, 0.4
    assert res.model.widths == [int(m.sum()) for m in res.masks]
    # stem and bn3 stay whole
    assert all(bool(res.masks[i].all()) for i in range(49) if i not in prunable_indices())
    assert res.record.params_before == count_params(model)
    assert res.record.params_after == count_params(res.model) < res.record.params_before


@pytest.mark.parametrize("ratio, threshold, per_layer, dead", [
    (0.25, 0.1, 3, 1),  # position 32 -> 0.1: 0.2/0.3/0.4 kept; dead layer rescued
    (0.02, 3e-4, 4, 1),  # position 2 -> 3e-4: the dead layer keeps 4e-4 on its own
    (0.9, 0.4, 1, 1),  # position 115 -> 0.4: nothing above it -> every layer rescued
])
def test_threshold_positions(ratio, threshold, per_layer, dead):
    res = prune(hand_set_model(), ratio, scope="prunable")
    assert res.record.threshold == pytest.approx(threshold)
    counts = kept(res.masks)
    assert counts[DEAD] == dead
    assert all(v == per_layer for k, v in counts.items() if k != DEAD)
    if ratio == 0.02:
        assert res.record.min_channels_kept == []
    if ratio == 0.9:
        assert len(res.record.min_channels_kept) == 32


def test_min_channels_keeps_the_largest_gammas():
    res = prune(hand_set_model(), 0.5, scope="prunable", min_channels=2)
    dead_idx = [n for n, _ in batchnorms(res.model)].index(DEAD)
    assert res.masks[dead_idx].tolist() == [True, False, True, False]  # 3e-4 and 4e-4
    assert res.record.min_channels_kept == [DEAD]
    assert res.model.widths[dead_idx] == 2


def test_scope_all_counts_the_stem_and_bn3():
    model = hand_set_model()
    n_all = len(all_gammas(model, "all"))
    assert n_all == 128 + 64 + 3 * 256 + 4 * 512 + 6 * 1024 + 3 * 2048
    # most channels (stem, bn3) have γ = 1, so the median is 1: every prunable layer empties
    assert threshold_of(units_of(model), 0.5, "all") == pytest.approx(1.0)
    res = prune(model, 0.5)  # scope "all" is the default (the reference rule)
    assert set(kept(res.masks).values()) == {1} and len(res.record.min_channels_kept) == 32
    # a ratio below the prunable share prunes like the prunable scope at a scaled ratio
    r = 64 / n_all  # position 64 -> 0.2, as prunable scope at 0.5
    assert threshold_of(units_of(model), r, "all") == pytest.approx(0.2)


def test_min_channels_zero_refuses_an_empty_layer():
    with pytest.raises(ParamError, match=f"removes every channel of {DEAD}; lower ratio or "
                                         "keep min_channels at 1"):
        prune(hand_set_model(), 0.5, scope="prunable", min_channels=0)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_ratio_outside_open_interval(ratio):
    with pytest.raises(ParamError, match=r"^ratio .* is outside \(0, 1\)"):
        prune(hand_set_model(), ratio)


def test_library_errors_name_the_parameter():
    """prune(model, 0.5, min_channels=-1) speaks Python; the CLI says --min-channels."""
    with pytest.raises(ParamError) as err:
        prune(hand_set_model(), 0.5, min_channels=-1)
    assert str(err.value) == "min_channels -1: must be 0 or more"
    assert err.value.cli_message() == "--min-channels -1: must be 0 or more; see --help"
    with pytest.raises(ValueError, match="^round_to 0: use 1"):  # a ValueError, as Python's
        prune(hand_set_model(), 0.5, round_to=0)


def test_bad_scope():
    with pytest.raises(ParamError, match="^scope 'some': use all or prunable$"):
        prune(hand_set_model(), 0.5, scope="some")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_gamma(bad):
    model = hand_set_model()
    with torch.no_grad():
        model.layer2[1].bn2.weight[0] = bad
    with pytest.raises(CheckpointError, match="not finite"):
        prune(model, 0.5)


def test_stage_summary():
    res = prune(hand_set_model(), 0.5, scope="prunable")
    assert stage_summary(res) == [("layer1", 12, 24), ("layer2", 16, 32),
                                        ("layer3", 23, 48), ("layer4", 12, 24)]


# ---------------------------------------------------------------- weights after pruning


def test_keep_all_masks_reproduce_the_outputs():
    model = randomize(ResNet50(widths=small_cfg(6)))
    masks = [torch.ones(bn.num_features, dtype=torch.bool) for _, bn in batchnorms(model)]
    new = apply_masks(model, masks).eval()
    assert new.widths == [bn.num_features for _, bn in batchnorms(model)]
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(new(x), model(x), rtol=1e-5, atol=1e-6)
    ref = model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in new.state_dict().items())


def test_pruning_zero_gamma_and_beta_channels_keeps_the_outputs():
    model = randomize(ResNet50(widths=small_cfg(6)), seed=1)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for i, (_, bn) in enumerate(batchnorms(model)):
            if i in prunable_indices():
                dead = torch.randperm(6, generator=gen)[: 1 + i % 4]  # 1..4 dead channels
                bn.weight[dead] = 0.0
                bn.bias[dead] = 0.0
    masks, rescued = masks_of(units_of(model), threshold=0.0)
    assert not rescued
    new = apply_masks(model, masks).eval()
    assert count_params(new) < count_params(model)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(new(x), model(x), rtol=1e-4, atol=1e-5)


def test_weights_are_sliced_by_the_masks():
    model = randomize(ResNet50(widths=small_cfg(4)), seed=3)
    src = copy.deepcopy(model)
    masks, _ = masks_of(units_of(model), threshold=1.0)  # γ in [0.5, 1.5): about half kept
    new = apply_masks(model, masks)
    names = [n for n, _ in batchnorms(model)]
    i = names.index("layer2.0.bn1")
    m1, m2 = masks[i], masks[i + 1]
    b_old, b_new = src.layer2[0], new.layer2[0]
    assert torch.equal(b_new.bn1.weight, b_old.bn1.weight[m1])
    assert torch.equal(b_new.bn1.running_var, b_old.bn1.running_var[m1])
    assert torch.equal(b_new.conv1.weight, b_old.conv1.weight[m1])
    assert torch.equal(b_new.conv2.weight, b_old.conv2.weight[m2][:, m1])
    assert torch.equal(b_new.conv3.weight, b_old.conv3.weight[:, m2])
    assert torch.equal(b_new.downsample[0].weight, b_old.downsample[0].weight)
    assert torch.equal(new.fc.weight, src.fc.weight)
    assert torch.equal(new.bn1.weight, src.bn1.weight)


# ---------------------------------------------------------------- the prune command


def prune_cfg(tmp_path: Path, data_dir: Path, **over) -> RunConfig:
    values = {"command": "prune", "checkpoint": str(tmp_path / "model_sparse.pth"),
              "ratio": 0.5, "dataset": "cifar10", "data_dir": str(data_dir), "download": False,
              "batch_size": 100, "cpu": True, "num_workers": 0}
    return RunConfig(**{**values, **over})


def write_sparse(tmp_path: Path) -> Path:
    path = tmp_path / "model_sparse.pth"
    save_checkpoint(path, make_checkpoint(randomize(ResNet50(widths=small_cfg(8)), seed=4)))
    return path


def test_prune_command_writes_checkpoint_metadata_and_gamma_plot(tmp_path, fake_cifar10,
                                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = write_sparse(tmp_path)
    out = tmp_path / "checkpoints" / "model_prune_50.pth"
    assert run_worker(prune_cfg(tmp_path, fake_cifar10, output=str(out))) == 0
    ckpt = load_checkpoint(out)
    meta = ckpt["prune"]
    assert meta["ratio"] == 0.5 and meta["source"] == str(src) and meta["scope"] == "all"
    original = build_model(load_checkpoint(src))
    assert meta["threshold"] == pytest.approx(threshold_of(units_of(original), 0.5))
    expected = prune(original, 0.5)
    assert ckpt["cfg"] == expected.model.widths
    assert meta["params_before"] == count_params(original)
    assert meta["params_after"] == count_params(build_model(ckpt)) < meta["params_before"]
    assert 0 <= meta["acc_before"] <= 100 and 0 <= meta["acc_after"] <= 100
    assert ckpt["config"]["ratio"] == 0.5
    png = tmp_path / "plots" / "model_prune_50_gamma.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prune_no_eval_and_missing_dataset_skip_accuracy(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_sparse(tmp_path)
    out1 = tmp_path / "a.pth"
    cfg = prune_cfg(tmp_path, tmp_path / "nodata", output=str(out1), eval=False)
    assert run_worker(cfg) == 0
    assert load_checkpoint(out1)["prune"]["acc_before"] is None
    capsys.readouterr()
    out2 = tmp_path / "b.pth"
    assert run_worker(cfg.replace(eval=True, output=str(out2))) == 0
    meta = load_checkpoint(out2)["prune"]
    assert meta["acc_before"] is None and meta["acc_after"] is None
    text = " ".join(capsys.readouterr().out.split())
    assert "note: accuracy not measured" in text and "cifar-10-batches-py" in text
    assert (tmp_path / "plots" / "b_gamma.png").exists()


def test_prune_refuses_non_finite_gamma_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = ResNet50(widths=small_cfg(2))
    with torch.no_grad():
        model.layer1[0].bn1.weight[0] = float("nan")
    save_checkpoint(tmp_path / "model_sparse.pth", make_checkpoint(model))
    out = tmp_path / "p.pth"
    with pytest.raises(CheckpointError, match="not finite"):
        run_worker(prune_cfg(tmp_path, tmp_path, output=str(out), eval=False))
    assert not out.exists() and not (tmp_path / "plots").exists()


def test_ties_at_the_threshold_are_counted_and_named(tmp_path, monkeypatch, capsys):
    """Half the bn1/bn2 γ are equal: ratio 0.3 lands on the tie, and all of it goes."""
    monkeypatch.chdir(tmp_path)
    model = randomize(ResNet50(widths=small_cfg(4)))
    bns = batchnorms(model)
    with torch.no_grad():
        for i in prunable_indices():  # 32 layers of 4: two tied γ, two larger ones
            bns[i][1].weight.copy_(torch.tensor([0.5, 0.5, 0.8, 0.9]))
    save_checkpoint(tmp_path / "model_sparse.pth", make_checkpoint(model))
    cfg = prune_cfg(tmp_path, tmp_path, output=str(tmp_path / "p.pth"), eval=False,
                    scope="prunable", ratio=0.3)
    assert run_worker(cfg) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "note: 64 channels have |γ| equal to the threshold" in text
    assert "so 50.0% of the prunable channels went at ratio 0.3" in text

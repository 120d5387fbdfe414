"""The lab's ResNet-50 (trainer.models.resnet): reference counts, layout and cfg validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.helpers import small_cfg
from trainer.models.family import batchnorms, count_params, unwrap_model
from trainer.models.resnet import (
    ResNet50,
    bn_names,
    default_widths,
    effective_widths,
    prunable_indices,
    validate_widths,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def full_model() -> ResNet50:
    torch.manual_seed(0)
    return ResNet50()


def test_unpruned_reference_params_and_thop_macs(full_model):
    import thop

    assert count_params(full_model) == 23_513_162
    model = ResNet50()  # thop hooks a model; keep the shared fixture clean
    macs, params = thop.profile(model, inputs=(torch.randn(1, 3, 32, 32),), verbose=False)
    assert int(macs) == 328_947_712
    assert int(params) == 23_513_162
    # the maintained thop fork leaves no counting buffers behind
    assert not [k for k in model.state_dict() if k.endswith(("total_ops", "total_params"))]


def test_layout_matches_the_lab(full_model):
    m = full_model
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert m.conv1.padding == (1, 1) and m.conv1.bias is None
    assert isinstance(m.maxpool, nn.MaxPool2d) and m.maxpool.kernel_size == 3
    assert m.maxpool.stride == 2 and m.maxpool.padding == 1
    assert [len(getattr(m, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    assert isinstance(m.avgpool, nn.AdaptiveAvgPool2d)
    assert (m.fc.in_features, m.fc.out_features) == (2048, 10)
    state = m.state_dict()
    for stage, (cin, cout, stride) in enumerate(
            [(64, 256, 1), (256, 512, 2), (512, 1024, 2), (1024, 2048, 2)], start=1):
        block = getattr(m, f"layer{stage}")[0]
        # the downsample is ONE 1x1 conv and no BatchNorm
        assert len(block.downsample) == 1
        conv = block.downsample[0]
        assert isinstance(conv, nn.Conv2d) and conv.bias is None
        assert conv.kernel_size == (1, 1) and conv.stride == (stride, stride)
        assert tuple(state[f"layer{stage}.0.downsample.0.weight"].shape) == (cout, cin, 1, 1)
        assert block.conv2.stride == (stride, stride)  # stride on the 3x3 conv
        assert block.conv1.stride == (1, 1)
        assert all(getattr(m, f"layer{stage}")[b].downsample is None
                   for b in range(1, len(getattr(m, f"layer{stage}"))))
    assert not any(".downsample.1" in k for k in state)
    assert "layer1.0.downsample.0.weight" in state
    out = m.eval()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_cfg_has_one_entry_per_batchnorm(full_model):
    cfg = default_widths()
    assert len(cfg) == len(bn_names()) == 49
    assert cfg[:4] == [64, 64, 64, 256]
    assert cfg[-3:] == [512, 512, 2048]
    names = bn_names()
    assert names[:4] == ["bn1", "layer1.0.bn1", "layer1.0.bn2", "layer1.0.bn3"]
    assert [n for n, _ in batchnorms(full_model)] == names
    assert [m.num_features for _, m in batchnorms(full_model)] == cfg
    assert len(prunable_indices()) == 32
    assert all(names[i].endswith((".bn1", ".bn2")) for i in prunable_indices())


def test_pruned_cfg_builds_those_widths():
    cfg = small_cfg(4)
    m = ResNet50(widths=cfg)
    assert [bn.num_features for _, bn in batchnorms(m)] == effective_widths(cfg)
    assert m.layer2[0].conv1.out_channels == 4 and m.layer2[0].conv2.in_channels == 4
    assert m.layer2[0].conv3.out_channels == 512
    assert m.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_stem_and_bn3_entries_are_ignored():
    """Lab files carry pruned counts at the stem / bn3 positions; the built widths stay full."""
    cfg = small_cfg(4)
    names = bn_names()
    for i, name in enumerate(names):
        if i not in prunable_indices():
            cfg[i] = 7  # what a lab file might say there
    m = ResNet50(widths=cfg)
    widths = [bn.num_features for _, bn in batchnorms(m)]
    full = default_widths()
    for i, name in enumerate(names):
        assert widths[i] == (4 if i in prunable_indices() else full[i]), name
    assert m.widths == cfg  # kept as given (it is what the file said)
    # even 0 or a negative count there is accepted: it is ignored
    cfg[0] = 0
    assert effective_widths(cfg)[0] == 64


@pytest.mark.parametrize("cfg, needles", [
    ([64] * 48, ["48 entries", "expected 49", "BatchNorm2d"]),
    ([64] * 50, ["50 entries", "expected 49"]),
])
def test_bad_cfg_length(cfg, needles):
    with pytest.raises(ValueError) as err:
        ResNet50(widths=cfg)
    for needle in needles:
        assert needle in str(err.value)


def test_prunable_entry_below_one_names_index_layer_and_range():
    cfg = default_widths()
    cfg[4] = 0  # layer1.1.bn1
    with pytest.raises(ValueError) as err:
        validate_widths(cfg)
    msg = str(err.value)
    assert "cfg[4]" in msg and "layer1.1.bn1" in msg and "1..64" in msg


def test_prunable_entry_above_full_width():
    cfg = default_widths()
    cfg[2] = 65  # layer1.0.bn2
    with pytest.raises(ValueError, match=r"cfg\[2\] \(layer1\.0\.bn2\).*1\.\.64"):
        ResNet50(widths=cfg)


@pytest.mark.parametrize("value", [3.5, "8", True, None])
def test_non_integer_entry(value):
    cfg = default_widths()
    cfg[8] = value  # layer1.2.bn2
    with pytest.raises(ValueError) as err:
        ResNet50(widths=cfg)
    msg = str(err.value)
    assert "cfg[8]" in msg and "layer1.2.bn2" in msg and "integer" in msg


def test_cfg_as_tensor_is_accepted():
    assert validate_widths(torch.tensor(small_cfg(4))) == small_cfg(4)


def test_bad_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        ResNet50(num_classes=0)


def test_unwrap_model_strips_dataparallel_and_compile_wrappers():
    inner = ResNet50(widths=small_cfg(2))

    class Compiled(nn.Module):  # what torch.compile's OptimizedModule looks like
        def __init__(self, mod):
            super().__init__()
            self._orig_mod = mod

    wrapped = Compiled(nn.DataParallel(inner))
    assert unwrap_model(wrapped) is inner
    assert unwrap_model(inner) is inner

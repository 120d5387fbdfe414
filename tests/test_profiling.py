"""Parameter / MAC counting (trainer.measure.profiling): exact numbers, wrappers, bad input."""

from __future__ import annotations

import copy

import pytest
import thop
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from launch.plan import free_port
from trainer.errors import CheckpointError, UserError
from trainer.files.checkpoint import make_checkpoint, save_checkpoint
from trainer.measure.profiling import (
    MAX_INPUT_SIZE,
    check_input_size,
    measure_latency,
    profile_checkpoint,
    profile_model,
)
from trainer.models.family import count_params
from trainer.models.resnet import ResNet50, default_widths, prunable_indices

FULL_PARAMS = 23_513_162
FULL_MACS = 328_947_712  # thop, 1x3x32x32: convs + linear + BatchNorm + avg-pool


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These models are tiny: one thread is as fast when idle and ~5x faster on a loaded
    2-core machine, where two spinning OpenMP threads fight the other jobs for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def halved_cfg() -> list[int]:
    cfg = default_widths()
    for i in prunable_indices():
        cfg[i] //= 2
    return cfg


def tiny_cfg() -> list[int]:
    cfg = default_widths()
    for i in prunable_indices():
        cfg[i] = max(1, cfg[i] // 16)
    return cfg


@pytest.fixture(scope="module")
def full_model() -> ResNet50:
    torch.manual_seed(0)
    return ResNet50()


def snapshot(model: nn.Module) -> dict:
    """What profiling must not change: keys, values, modes, devices, no thop leftovers."""
    return {
        "keys": list(model.state_dict()),
        "values": {k: v.clone() for k, v in model.state_dict().items()},
        "modes": [m.training for m in model.modules()],
        "devices": {p.device for p in model.parameters()},
    }


def assert_untouched(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["keys"] == before["keys"]
    assert after["modes"] == before["modes"]
    assert after["devices"] == before["devices"]
    for k, v in before["values"].items():
        assert torch.equal(after["values"][k], v), k
    for m in model.modules():
        assert "total_ops" not in m.__dict__ and "total_ops" not in m._buffers
        assert "total_params" not in m.__dict__ and "total_params" not in m._buffers
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_full_resnet50_counts(full_model):
    before = snapshot(full_model)
    info = profile_model(full_model)
    assert info == {"params": FULL_PARAMS, "macs": FULL_MACS, "flops": 2 * FULL_MACS,
                    "input_size": 32}
    assert all(isinstance(info[k], int) for k in ("params", "macs", "flops"))
    assert_untouched(full_model, before)


def test_batch_scales_macs_not_params():
    model = ResNet50(widths=tiny_cfg())
    one, four = profile_model(model), profile_model(model, batch=4)
    assert four["params"] == one["params"] == count_params(model)
    assert four["macs"] == 4 * one["macs"]


def thop_conv_linear_macs(model: nn.Module, size: int = 32) -> int:
    """thop's MACs of Conv2d and Linear modules only, from its per-layer tree.

    ``ret_layer_info`` returns {child: (ops incl. subtree, params, grandchildren)}; a conv or
    linear is a leaf, so its entry is exactly thop's count for that layer. Reading the tree
    (rather than re-hooking) checks thop's own numbers, the ones profile_model reports.
    """
    work = copy.deepcopy(model).eval()
    _, _, tree = thop.profile(work, inputs=(torch.zeros(1, 3, size, size),), verbose=False,
                              ret_layer_info=True)
    modules = dict(work.named_modules())
    total = 0.0

    def walk(prefix: str, sub: dict) -> None:
        nonlocal total
        for name, (ops, _params, children) in sub.items():
            full = prefix + name
            if isinstance(modules[full], (nn.Conv2d, nn.Linear)):
                total += ops
            walk(full + ".", children)

    walk("", tree)
    return round(total)


def flop_counter_flops(model: nn.Module, size: int = 32) -> int:
    """PyTorch's own count: it sees only convolutions and matmuls, at 2 FLOPs per MAC."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(1, 3, size, size))
    return counter.get_total_flops()


@pytest.mark.parametrize("cfg_name", ["full", "halved"])
def test_thop_agrees_with_torch_flop_counter(cfg_name, full_model):
    model = full_model if cfg_name == "full" else ResNet50(widths=halved_cfg())
    thop_macs = thop_conv_linear_macs(model)
    torch_flops = flop_counter_flops(copy.deepcopy(model))
    assert abs(2 * thop_macs - torch_flops) <= 0.005 * torch_flops
    # the rest of thop's total is BatchNorm + pooling: small, but not zero
    total = profile_model(model)["macs"]
    assert thop_macs < total < 1.02 * thop_macs
    if cfg_name == "halved":
        assert total < 0.5 * FULL_MACS  # each pruned conv loses a factor 2 on one or both sides


def test_data_parallel_gives_bare_numbers(full_model):
    wrapped = nn.DataParallel(full_model)  # on a CPU-only machine it just forwards to .module
    wrapped.train()
    try:
        before = snapshot(wrapped)
        info = profile_model(wrapped)
        assert (info["params"], info["macs"]) == (FULL_PARAMS, FULL_MACS)
        assert_untouched(wrapped, before)
        assert all(k.startswith("module.") for k in wrapped.state_dict())
    finally:
        full_model.eval()  # the fixture is shared by the module's tests


def test_ddp_gives_bare_numbers(monkeypatch):
    model = ResNet50(widths=halved_cfg())
    bare = profile_model(model)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        ddp.train()
        before = snapshot(ddp)
        assert profile_model(ddp) == bare
        assert_untouched(ddp, before)
    finally:
        dist.destroy_process_group()


def test_compiled_wrapper_is_unwrapped():
    model = ResNet50(widths=tiny_cfg())
    compiled = torch.compile(model)  # lazy: nothing compiles unless it is called
    assert profile_model(compiled) == profile_model(model)


@pytest.mark.parametrize("size", range(1, 10))
def test_every_small_input_size_runs(size):
    # padding on every stride-2 layer keeps a 1x1 map 1x1, so the smallest valid size is 1
    info = profile_model(ResNet50(widths=tiny_cfg()), input_size=size)
    assert info["input_size"] == size and info["macs"] > 0


def test_macs_grow_with_input_area():
    model = ResNet50(widths=tiny_cfg())
    small, big = profile_model(model, 32)["macs"], profile_model(model, 64)["macs"]
    assert 3.5 * small < big < 4.0 * small  # 4x area; the final linear layer does not grow


@pytest.mark.parametrize("bad", [0, -1, MAX_INPUT_SIZE + 1, 2.5, "32", True, None])
def test_bad_input_size_is_a_user_error(bad):
    with pytest.raises(UserError, match="--input-size"):
        check_input_size(bad)
    with pytest.raises(UserError, match="--input-size"):
        profile_model(ResNet50(widths=tiny_cfg()), input_size=bad)


def test_bad_batch_is_a_user_error():
    with pytest.raises(UserError, match="batch"):
        profile_model(ResNet50(widths=tiny_cfg()), batch=0)


@pytest.fixture
def small_ckpt(tmp_path):
    model = ResNet50(widths=tiny_cfg())
    history = {"epoch": [1, 2, 3], "lr": [0.1, 0.1, 0.01], "train_loss": [2.0, 1.5, 1.2],
               "train_acc": [30.0, 45.0, 50.0], "test_loss": [2.1, 1.7, 1.4],
               "test_acc": [28.0, 41.5, 40.0]}
    path = tmp_path / "tiny.pth"
    save_checkpoint(path, make_checkpoint(model, history=history))
    return path, model


def test_profile_checkpoint(small_ckpt):
    path, model = small_ckpt
    info = profile_checkpoint(path)
    assert info["name"] == "tiny" and info["path"] == str(path)
    assert info["params"] == count_params(model)
    assert info["macs"] == profile_model(model)["macs"] and info["flops"] == 2 * info["macs"]
    assert info["best_acc"] == 41.5  # max of the history's test_acc


def test_profile_checkpoint_without_history_has_no_best_acc(tmp_path):
    path = tmp_path / "bare.pth"
    save_checkpoint(path, make_checkpoint(ResNet50(widths=tiny_cfg())))
    assert "best_acc" not in profile_checkpoint(path)


def test_profile_checkpoint_bad_files(tmp_path, small_ckpt):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(CheckpointError):
        profile_checkpoint(junk)
    vgg = tmp_path / "vgg.pth"
    torch.save({"arch": "vgg16", "cfg": [64], "state_dict": {}}, vgg)
    with pytest.raises(CheckpointError, match="vgg16"):
        profile_checkpoint(vgg)
    with pytest.raises(UserError, match="--input-size"):
        profile_checkpoint(small_ckpt[0], input_size=0)


def test_measure_latency_cpu():
    model = ResNet50(widths=tiny_cfg()).train()
    before = snapshot(model)
    out = measure_latency(model, "cpu", input_size=16, batches=(1, 2), warmup=1, repeats=2)
    assert out["device"] == "cpu" and out["input_size"] == 16 and out["repeats"] == 2
    assert [b["batch"] for b in out["batches"]] == [1, 2]
    for b in out["batches"]:
        assert b["ms_per_batch"] > 0
        assert b["ms_per_image"] == pytest.approx(b["ms_per_batch"] / b["batch"])
    assert_untouched(model, before)


def test_profile_and_export_measure_a_checkpoint_at_its_trained_size(tmp_path):
    """The demo's 16x16 checkpoints were profiled at 32x32 (4x the MACs report.md gave)."""
    from tests.helpers import make_small_checkpoint
    from trainer.files.export import export_checkpoint
    from trainer.measure.profiling import profile_checkpoint

    path = make_small_checkpoint(tmp_path / "s16.pth", config={"image_size": 16})
    at16 = profile_checkpoint(path)
    assert at16["input_size"] == 16
    at32 = profile_checkpoint(path, 32)
    assert at16["macs"] == profile_checkpoint(path, 16)["macs"] < at32["macs"]
    bare = make_small_checkpoint(tmp_path / "bare.pth")  # no settings saved: CIFAR's 32
    assert profile_checkpoint(bare)["input_size"] == 32
    info = export_checkpoint(path, "torchscript", tmp_path / "s16.torchscript.pt")
    assert info["input_size"] == 16


@pytest.mark.parametrize("arch", ["densenet40", "resnet164"])
def test_a_pruned_model_with_channel_selections_is_profiled(arch):
    """A pruned ResNet-164/DenseNet-40 keeps its BatchNorms whole and selects channels; the
    weightless copy that checks the input size once lost the selections ("Invalid channel
    dimensions" for every such file)."""
    from trainer.models.build import new_model
    from trainer.prune.engine import prune

    torch.manual_seed(0)
    model = new_model(arch, 10)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand_like(m.weight)
    pruned = prune(model, 0.7, scope="prunable").model
    counted = profile_model(pruned, 32)
    with torch.no_grad():
        macs, _ = thop.profile(copy.deepcopy(pruned).eval(), inputs=(torch.zeros(1, 3, 32, 32),),
                               verbose=False)
    assert counted["macs"] == round(float(macs))
    assert counted["params"] == count_params(pruned) < count_params(model)

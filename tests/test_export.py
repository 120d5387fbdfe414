"""``export``: ONNX / TorchScript / safetensors files that compute what the model does, and
.safetensors checkpoints that load everywhere a .pth does (trainer.files.export,
trainer.files.safetensors_io)."""

from __future__ import annotations

import json
import struct
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fakedata import write_fake_cifar10
from tests.helpers import FAST, make_small_checkpoint, run_cli
from trainer.config import exports
from trainer.config.exports import resolve_output
from trainer.errors import CheckpointError, UserError
from trainer.files import export as ex
from trainer.files.checkpoint import build_model, load_checkpoint, make_checkpoint, save_checkpoint
from trainer.files.export import export_checkpoint
from trainer.files.safetensors_io import is_safetensors, load_safetensors, save_safetensors
from trainer.measure.bench import random_gamma_model
from trainer.prune.engine import prune

HISTORY = {"epoch": [1, 2], "lr": [0.1, 0.01], "train_loss": [2.0, 1.5],
           "train_acc": [30.0, 45.0], "test_loss": [2.1, 1.7], "test_acc": [28.0, 41.5]}
ONNX_FORMATS = ("onnx", "torchscript")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def needs_onnx():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")


def pruned_checkpoint(path: Path, arch: str, ratio: float | None, **extra) -> Path:
    """``arch`` with seeded U(0, 1) γ, pruned at ``ratio`` (None: unpruned), saved."""
    model = random_gamma_model(10, 0, arch)
    if ratio is not None:
        model = prune(model, ratio).model
    save_checkpoint(path, make_checkpoint(model, **extra))
    return path


def outputs(path: Path, x: torch.Tensor) -> torch.Tensor:
    model = build_model(load_checkpoint(path)).eval()  # a torchvision replay needs autograd
    with torch.no_grad():
        return model(x)


def run_file(fmt: str, path: Path, x: torch.Tensor) -> torch.Tensor:
    """What a user's runtime computes from the exported file."""
    if fmt == "onnx":
        return torch.from_numpy(ex.onnx_session(path).run(None, {"input": x.numpy()})[0])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.9: torch.jit is deprecated
        return torch.jit.load(str(path)).eval()(x)


def assert_exported(src: Path, fmt: str, out: Path, batch: int | None = None) -> None:
    """The file is there, reported checked, and computes the model's outputs on new data
    (at another batch size than the check's when the batch is dynamic)."""
    info = export_checkpoint(src, fmt, out, batch=batch)
    assert info["output"] == str(out) and out.is_file()
    assert info["max_abs_diff"] <= exports.TOLERANCE
    n = batch or 3
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    got = run_file(fmt, out, x)
    assert (got - outputs(src, x)).abs().max().item() <= exports.TOLERANCE
    assert not list(out.parent.glob(".*.tmp"))  # no temp file left


# ---------------------------------------------------------------- fast tier


def test_safetensors_round_trip_keeps_weights_and_metadata(tmp_path):
    src = make_small_checkpoint(tmp_path / "m.pth", history=HISTORY, best_acc=41.5,
                                best_epoch=2, prune={"ratio": 0.5, "scope": "all"})
    info = export_checkpoint(src, "safetensors")
    out = tmp_path / "m.safetensors"
    assert info["output"] == str(out) and info["max_abs_diff"] == 0.0
    a, b = load_checkpoint(src), load_checkpoint(out)
    for key in ("arch", "num_classes", "cfg", "history", "best_acc", "best_epoch", "prune"):
        assert a[key] == b[key], key
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as fh:  # what Hugging Face / timm tools read
        meta = fh.metadata()
    assert meta["format"] == "pt" and meta["arch"] == "resnet50"
    assert all(isinstance(v, str) for v in meta.values())
    assert json.loads(meta["cfg"]) == a["cfg"] and json.loads(meta["num_classes"]) == 10


def test_a_safetensors_file_without_metadata_is_read_by_its_keys(tmp_path):
    from safetensors.torch import save_file

    src = make_small_checkpoint(tmp_path / "m.pth")
    state = load_checkpoint(src)["state_dict"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "bare.safetensors"))
    ckpt = load_checkpoint(tmp_path / "bare.safetensors")
    assert ckpt["arch"] == "resnet50" and ckpt["cfg"] == load_checkpoint(src)["cfg"]


def test_safetensors_are_recognised_by_content_too(tmp_path):
    src = make_small_checkpoint(tmp_path / "m.pth")
    save_safetensors(tmp_path / "renamed.bin", load_checkpoint(src))
    assert is_safetensors(tmp_path / "renamed.bin") and not is_safetensors(src)
    assert not is_safetensors(tmp_path / "missing.pth") and not is_safetensors(tmp_path)
    assert load_checkpoint(tmp_path / "renamed.bin")["arch"] == "resnet50"


def rewrite_header(path: Path, **changes: str) -> None:
    """Edit a safetensors file's ``__metadata__`` in place, as a hand or a tool would."""
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    header["__metadata__"].update(changes)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + size:])


@pytest.mark.parametrize(("changes", "message"), [
    ({"cfg": "WIDTHS"}, r"cfg and state_dict disagree"),
    ({"arch": "alexnet"}, r"names the architecture 'alexnet', which slimtune does not know"),
    ({"cfg": "[64, 4"}, r"header field 'cfg' is not valid JSON"),
    ({"num_classes": '"ten"'}, r"num_classes is a str"),
], ids=["wrong-widths", "unknown-arch", "bad-json", "num-classes-not-int"])
def test_a_tampered_header_is_one_line(tmp_path, changes, message):
    src = make_small_checkpoint(tmp_path / "m.pth")
    path = tmp_path / "m.safetensors"
    save_safetensors(path, load_checkpoint(src))
    if changes.get("cfg") == "WIDTHS":
        cfg = load_checkpoint(src)["cfg"]
        cfg[1] += 4
        changes = {"cfg": json.dumps(cfg)}
    rewrite_header(path, **changes)
    with pytest.raises(CheckpointError, match=message) as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value)


def test_a_damaged_safetensors_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10" * 64)
    with pytest.raises(CheckpointError, match="is not a valid safetensors file"):
        load_checkpoint(bad)
    src = make_small_checkpoint(tmp_path / "m.pth")
    good = save_safetensors(tmp_path / "cut.safetensors", load_checkpoint(src))
    good.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="is not a valid safetensors file"):
        load_safetensors(good)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_output_paths(tmp_path):
    src = tmp_path / "model.pth"
    assert exports.default_output(src, "onnx") == tmp_path / "model.onnx"
    assert exports.default_output(src, "torchscript") == tmp_path / "model.torchscript.pt"
    assert exports.default_output(src, "safetensors") == tmp_path / "model.safetensors"
    with pytest.raises(UserError, match="is the input checkpoint"):
        resolve_output(tmp_path / "m.safetensors", "safetensors", None)
    with pytest.raises(UserError, match="--output .* is the input checkpoint"):
        resolve_output(src, "onnx", src)
    with pytest.raises(UserError, match="is a folder"):
        resolve_output(src, "onnx", tmp_path)
    with pytest.raises(UserError, match="--format 'pdf': use onnx, torchscript or safetensors"):
        exports.check_format("pdf")


def test_bad_opset_and_input_size_are_one_line(tmp_path):
    for opset in (8, 99):
        with pytest.raises(UserError, match=f"--opset {opset} is outside what torch"):
            ex.check_opset(opset)
    assert ex.check_opset(ex.DEFAULT_OPSET) == ex.DEFAULT_OPSET
    src = pruned_checkpoint(tmp_path / "vgg.pth", "vgg11", 0.95)
    with pytest.raises(UserError, match=r"vgg11 of .* does not run at input 3×8×8 .*--input-size"):
        export_checkpoint(src, "safetensors", input_size=8)


def test_a_file_that_differs_is_not_written_and_exits_1(tmp_path, monkeypatch):
    src = make_small_checkpoint(tmp_path / "m.pth")
    monkeypatch.setitem(ex.CHECKS, "safetensors", lambda path, x: torch.zeros(len(x), 10))
    with pytest.raises(ex.ExportMismatch, match=r"max \|Δ\| = .* > 1e-04") as err:
        export_checkpoint(src, "safetensors")
    assert err.value.exit_code == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pth"]  # nothing written


def test_onnx_without_the_extra_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    src = make_small_checkpoint(tmp_path / "m.pth")
    with pytest.raises(UserError, match=r"--format onnx needs onnx and onnxruntime, and .*"
                                        r"not installed; pip install -e \"\.\[export\]\""):
        export_checkpoint(src, "onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("fmt", ONNX_FORMATS)
def test_a_pruned_vgg_exports_and_matches(tmp_path, fmt):
    """Fast: a VGG-11 pruned to a few channels (each file is checked at batch 4 and run here
    at batch 3, so the batch axis is dynamic)."""
    if fmt == "onnx":
        needs_onnx()
    src = pruned_checkpoint(tmp_path / "vgg.pth", "vgg11", 0.95)
    assert_exported(src, fmt, tmp_path / f"vgg{exports.SUFFIXES[fmt]}")


def test_a_fixed_batch_onnx_file(tmp_path):
    needs_onnx()
    src = pruned_checkpoint(tmp_path / "vgg.pth", "vgg11", 0.95)
    out = tmp_path / "vgg_b5.onnx"
    assert_exported(src, "onnx", out, batch=5)
    shape = ex.onnx_session(out).get_inputs()[0].shape
    assert shape == [5, 3, 32, 32]
    dynamic = tmp_path / "vgg.onnx"
    export_checkpoint(src, "onnx", dynamic)
    assert isinstance(ex.onnx_session(dynamic).get_inputs()[0].shape[0], str)  # "batch"


# ---------------------------------------------------------------- slow tier: every arch


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ONNX_FORMATS)
@pytest.mark.parametrize("ratio", [None, 0.9], ids=["unpruned", "pruned90"])
def test_lab_resnet50_exports(tmp_path, fmt, ratio):
    if fmt == "onnx":
        needs_onnx()
    src = pruned_checkpoint(tmp_path / "r50.pth", "resnet50", ratio)
    assert_exported(src, fmt, tmp_path / f"r50{exports.SUFFIXES[fmt]}")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ONNX_FORMATS)
@pytest.mark.parametrize(("arch", "ratio"), [
    ("vgg11", None), ("resnet164", 0.5), ("densenet40", None), ("densenet40", 0.5),
    ("torchvision:resnet18", 0.5), ("resnet18", 0.5),
])
def test_other_arches_export(tmp_path, fmt, arch, ratio):
    """Channel selection (index_select on a constant index) and replayed torchvision pruning
    export to both formats."""
    if fmt == "onnx":
        needs_onnx()
    src = pruned_checkpoint(tmp_path / "m.pth", arch, ratio)
    assert_exported(src, fmt, tmp_path / f"m{exports.SUFFIXES[fmt]}")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet164", "torchvision:resnet18"])
def test_safetensors_of_selection_and_torchvision_models(tmp_path, arch):
    src = pruned_checkpoint(tmp_path / "m.pth", arch, 0.5)
    out = tmp_path / "m.safetensors"
    export_checkpoint(src, "safetensors")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(outputs(out, x), outputs(src, x))


# ---------------------------------------------------------------- slow tier: the real CLI


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("export_cli")
    write_fake_cifar10(folder / "data")
    make_small_checkpoint(folder / "small.pth", history=HISTORY)
    return folder


def _evaluate(folder: Path, ckpt: str) -> dict:
    r = run_cli("evaluate", ckpt, "--dataset", "cifar10", "--data-dir", "data", "--no-download",
                "--json", "--cpu", "--num-workers", "0", cwd=folder)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def pth_metrics(cifar_folder) -> dict:
    """``evaluate small.pth --json`` (run once for the tests below)."""
    return _evaluate(cifar_folder, "small.pth")


@pytest.mark.slow
def test_onnx_on_the_test_set_counts_what_evaluate_counts(cifar_folder, pth_metrics):
    needs_onnx()
    from trainer.data.datasets import build_datasets

    r = run_cli("export", "small.pth", "--format", "onnx", cwd=cifar_folder)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "onnx.checker passed" in r.stdout and "max |Δ|" in r.stdout
    test = build_datasets("cifar10", str(cifar_folder / "data"), download=False).test
    images = torch.stack([test[i][0] for i in range(len(test))]).numpy()
    labels = np.array([test[i][1] for i in range(len(test))])
    logits = ex.onnx_session(cifar_folder / "small.onnx").run(None, {"input": images})[0]
    correct = int((logits.argmax(1) == labels).sum())
    assert (correct, len(labels)) == (pth_metrics["correct"], pth_metrics["total"])


@pytest.mark.slow
def test_safetensors_through_evaluate_and_finetune(cifar_folder, pth_metrics):
    r = run_cli("export", "small.pth", "--format", "safetensors", "--json", cwd=cifar_folder)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["output"] == "small.safetensors"
    assert _evaluate(cifar_folder, "small.safetensors") == pth_metrics
    r = run_cli("finetune", "--checkpoint", "small.safetensors", "--dataset", "cifar10",
                "--data-dir", "data", "--no-download", "--epochs", "1", "--limit-batches", "2",
                *FAST, cwd=cifar_folder)
    assert r.returncode == 0, r.stderr[-2000:]
    tuned = load_checkpoint(cifar_folder / "small_finetune.pth")
    assert tuned["cfg"] == load_checkpoint(cifar_folder / "small.pth")["cfg"]
    assert len(tuned["history"]["epoch"]) == 1


@pytest.mark.slow
def test_cli_export_torchscript_and_refusals(cifar_folder):
    r = run_cli("export", "small.pth", "--format", "torchscript", "--output", "ts/small.pt",
                cwd=cifar_folder)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (cifar_folder / "ts" / "small.pt").is_file()
    r = run_cli("export", "small.pth", "--format", "onnx", "--batch-size", "2",
                "--dynamic-batch", cwd=cifar_folder)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --batch-size 2 fixes the batch and --dynamic-batch frees it; give one of "
        "them, not both"]

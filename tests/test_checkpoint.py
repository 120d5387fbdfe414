"""Checkpoints (trainer.files.checkpoint) and ``info``: safe loading, lab files, atomic saves."""

from __future__ import annotations

import errno
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.fakedata import truncate_file
from tests.helpers import make_small_checkpoint, run_cli, small_cfg
from trainer.cli.app import build_app, run_app
from trainer.commands.info import describe
from trainer.errors import CheckpointError
from trainer.files.checkpoint import (
    FORMAT_VERSION,
    atomic_torch_save,
    build_model,
    load_checkpoint,
    make_checkpoint,
    save_checkpoint,
    summarize_history,
)
from trainer.models.family import count_params
from trainer.models.resnet import ResNet50, bn_names, default_widths, prunable_indices

HISTORY = {"epoch": [1, 2, 3], "lr": [1e-3, 1e-3, 1e-4], "train_loss": [2.0, 1.5, 1.2],
           "train_acc": [20.0, 40.0, 55.5], "test_loss": [2.1, 1.6, 1.7],
           "test_acc": [18.0, 47.25, 44.0]}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def lab_cfg(width: int = 4) -> list[int]:
    """A cfg as the lab's pruning script writes it: pruned counts at stem/bn3 positions too."""
    cfg = small_cfg(width)
    for i in range(len(cfg)):
        if i not in prunable_indices():
            cfg[i] = max(1, cfg[i] // 3)
    return cfg


def write_lab_file(path: Path, num_classes: int = 10, width: int = 4,
                   prefix: str = "module.") -> ResNet50:
    """The lab's bare ``{cfg, state_dict}`` save of a DataParallel model."""
    torch.manual_seed(1)
    model = ResNet50(num_classes, small_cfg(width))
    state = {prefix + k: v for k, v in model.state_dict().items()}
    torch.save({"cfg": lab_cfg(width), "state_dict": state}, path)
    return model


class OpenFile:
    """Unpickling this would create (truncate) a file: the classic pickle payload."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


class RunCommand:
    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


# ---------------------------------------------------------------- round trip


def test_save_load_round_trip_with_weights_only(tmp_path):
    torch.manual_seed(0)
    model = ResNet50(widths=small_cfg(3))
    path = tmp_path / "m.pth"
    save_checkpoint(path, make_checkpoint(model, history=HISTORY, best_acc=47.25, best_epoch=2,
                                          config={"lr": 1e-3, "ratios": [0.5]}))
    raw = torch.load(path, weights_only=True)  # the format promise, independent of our loader
    assert raw["format_version"] == FORMAT_VERSION and raw["arch"] == "resnet50"
    assert raw["num_classes"] == 10 and raw["cfg"] == small_cfg(3)
    ckpt = load_checkpoint(path)
    ref = model.state_dict()
    assert ckpt["state_dict"].keys() == ref.keys()
    assert all(torch.equal(ckpt["state_dict"][k], ref[k]) for k in ref)
    assert ckpt["history"] == HISTORY
    assert (ckpt["best_acc"], ckpt["best_epoch"]) == (47.25, 2)
    assert ckpt["config"] == {"lr": 1e-3, "ratios": [0.5]}
    rebuilt = build_model(ckpt).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(rebuilt(x), model.eval()(x))
    assert summarize_history(ckpt) == {"best_acc": 47.25, "best_epoch": 2, "epochs": 3}


def test_make_checkpoint_unwraps_and_drops_thop_buffers():
    model = ResNet50(widths=small_cfg(2))
    model.fc.register_buffer("total_ops", torch.zeros(1))  # what the old thop left behind
    ckpt = make_checkpoint(nn.DataParallel(model), best_acc=None)
    keys = list(ckpt["state_dict"])
    assert keys and not any(k.startswith("module.") or "total_ops" in k for k in keys)
    assert "best_acc" not in ckpt  # None extras are left out


def test_summarize_history_without_best_fields():
    assert summarize_history({"history": HISTORY}) == {"best_acc": 47.25, "best_epoch": 2,
                                                       "epochs": 3}
    assert summarize_history({}) == {"best_acc": None, "best_epoch": None, "epochs": 0}


# ---------------------------------------------------------------- lab files


@pytest.mark.parametrize("prefix", ["module.", "", "module._orig_mod."])
def test_lab_file_loads_and_takes_num_classes_from_fc(tmp_path, prefix):
    path = tmp_path / "model_prune.pth"
    model = write_lab_file(path, num_classes=100, prefix=prefix)
    ckpt = load_checkpoint(path)
    assert ckpt["num_classes"] == 100 and ckpt["format_version"] == 0
    assert ckpt["cfg"] == lab_cfg()
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["state_dict"])
    rebuilt = build_model(ckpt)
    assert count_params(rebuilt) == count_params(model)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(rebuilt.eval()(x), model.eval()(x))


def test_cfg_state_dict_mismatch_names_first_layer_and_both_shapes(tmp_path):
    torch.manual_seed(0)
    model = ResNet50(widths=small_cfg(8))
    cfg = small_cfg(8)
    idx = bn_names().index("layer2.1.bn1")
    cfg[idx] = 4  # the file's cfg says 4, its tensors say 8
    path = tmp_path / "bad.pth"
    torch.save({"cfg": cfg, "state_dict": model.state_dict()}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert "layer2.1.conv1.weight" in msg
    assert "(8, 512, 1, 1)" in msg and "(4, 512, 1, 1)" in msg
    assert f"cfg[{idx}]=4 for layer2.1.bn1" in msg


@pytest.mark.parametrize("payload, needle", [
    ({"state_dict": {}}, "no 'cfg'"),
    ({"cfg": default_widths()}, "no 'state_dict'"),
    ({"cfg": default_widths(), "state_dict": {"conv1.weight": torch.zeros(1)}}, "no fc.weight"),
    ({"cfg": [64] * 10, "state_dict": {}}, "expected 49"),
    ([1, 2, 3], "not a checkpoint dict"),
    ({"arch": "alexnet", "cfg": [], "state_dict": {}}, "'alexnet', which slimtune does not know"),
])
def test_incomplete_checkpoints(tmp_path, payload, needle):
    path = tmp_path / "x.pth"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=needle):
        load_checkpoint(path)


def test_missing_keys_are_named(tmp_path):
    state = ResNet50(widths=small_cfg(2)).state_dict()
    del state["layer3.2.bn2.running_var"]
    path = tmp_path / "x.pth"
    torch.save({"cfg": small_cfg(2), "state_dict": state}, path)
    with pytest.raises(CheckpointError,
                       match=r"missing 1 keys \(first: layer3\.2\.bn2\.running_var"):
        load_checkpoint(path)


# ---------------------------------------------------------------- unsafe / broken files


@pytest.mark.parametrize("payload_cls", [OpenFile, RunCommand])
@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_and_not_executed(tmp_path, payload_cls, writer):
    target = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pth"
    obj = {"cfg": default_widths(), "state_dict": {}, "extra": payload_cls(target)}
    if writer == "torch.save":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert "refused" in msg and "was not run" in msg
    assert "\n" not in msg
    assert not target.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_other_pickle_protocols_are_refused_without_running(tmp_path):
    target = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"x": OpenFile(target)}, protocol=pickle.HIGHEST_PROTOCOL))
    with pytest.raises(CheckpointError, match="refused.*nothing in it was run"):
        load_checkpoint(path)
    assert not target.exists()


@pytest.mark.parametrize("fraction", [0.0, 0.05, 0.5, 0.99])
def test_truncated_checkpoint(tmp_path, fraction):
    path = make_small_checkpoint(tmp_path / "t.pth", width=2)
    truncate_file(path, fraction)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


@pytest.mark.parametrize("content", [b"hello world\n", b'{"cfg": []}',
                                     b"\x89PNG\r\n\x1a\n" + bytes(64),
                                     pickle.dumps(2**80, protocol=2) + b"junk"])
def test_not_a_torch_file(tmp_path, content):
    path = tmp_path / "junk.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        load_checkpoint(path)


def test_missing_path_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(tmp_path)


# ---------------------------------------------------------------- atomic save


def test_failed_save_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = make_small_checkpoint(tmp_path / "keep.pth", width=2, seed=0)
    before = path.read_bytes()
    real_save = torch.save

    def half_then_crash(obj, fh, *args, **kwargs):
        real_save(obj, fh, *args, **kwargs)
        fh.truncate(100)  # a partly written file ...
        raise OSError(28, "No space left on device")  # ... then the disk fills up

    monkeypatch.setattr(torch, "save", half_then_crash)
    torch.manual_seed(5)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, make_checkpoint(ResNet50(widths=small_cfg(3))))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.pth"]
    assert load_checkpoint(path)["cfg"] == small_cfg(2)


def test_save_creates_folders_and_replaces(tmp_path):
    path = tmp_path / "a" / "b" / "m.pth"
    make_small_checkpoint(path, width=2)
    make_small_checkpoint(path, width=3)
    assert load_checkpoint(path)["cfg"] == small_cfg(3)
    assert [p.name for p in path.parent.iterdir()] == ["m.pth"]


# ---------------------------------------------------------------- info


def test_describe_lab_file(tmp_path):
    path = tmp_path / "model_prune.pth"
    model = write_lab_file(path)
    d = describe(str(path))
    assert d["params"] == count_params(model)
    assert d["format"].startswith("lab") and d["pruned"] is True
    assert d["num_classes"] == 10 and d["arch"] == "resnet50"
    assert [s["kept"] for s in d["stages"]] == [4 * 2 * n for n in (3, 4, 6, 3)]
    assert [s["full"] for s in d["stages"]] == [64 * 6, 128 * 8, 256 * 12, 512 * 6]
    assert d["stages"][0]["blocks"] == [[4, 4]] * 3
    assert d["epochs"] == 0 and d["best_acc"] is None


def test_info_json_in_process(tmp_path, capsys):

    path = make_small_checkpoint(tmp_path / "s.pth", width=2, history=HISTORY,
                                 prune={"ratio": 0.5, "threshold": 0.01, "source": "x.pth"})
    assert run_app(build_app(), ["info", str(path), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["params"] == count_params(ResNet50(widths=small_cfg(2)))
    assert (d["best_acc"], d["best_epoch"], d["epochs"]) == (47.25, 2, 3)
    assert d["prune"]["ratio"] == 0.5 and d["format"] == "slimtune"


@pytest.mark.slow
def test_info_cli_on_lab_file(tmp_path):
    path = tmp_path / "model_prune.pth"
    model = write_lab_file(path)
    r = run_cli("info", path, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"{count_params(model):,} params" in r.stdout
    assert "lab" in r.stdout and "layer4" in r.stdout
    assert "24 / 3072" in r.stdout  # layer3: 6 blocks x [4, 4] kept of 6 x [256, 256]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "truncated", "malicious"])
def test_info_cli_bad_checkpoint_one_line_exit_2(tmp_path, case):
    path = tmp_path / "bad.pth"
    target = tmp_path / "pwned.txt"
    if case == "truncated":
        make_small_checkpoint(path, width=2)
        truncate_file(path, 0.5)
    elif case == "malicious":
        torch.save({"cfg": default_widths(), "x": OpenFile(target)}, path)
    r = run_cli("info", path, cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert str(path) in lines[0]
    assert {"missing": "does not exist", "truncated": "truncated",
            "malicious": "refused"}[case] in lines[0]
    assert not target.exists()


def test_bare_state_dict_gets_its_cfg_from_the_shapes(tmp_path):
    """``torch.save(model.state_dict())`` of a (pruned, DataParallel) model loads as it is."""
    model = ResNet50(10, small_cfg(3))
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "bare.pth")
    ckpt = load_checkpoint(tmp_path / "bare.pth")
    assert ckpt["cfg"] == model.widths and ckpt["num_classes"] == 10
    assert all(torch.equal(ckpt["state_dict"][k], v) for k, v in model.state_dict().items())


def test_bare_state_dict_of_another_network_is_named_as_such(tmp_path):
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(CheckpointError, match=r"r18\.pth is a bare state_dict \(122 tensors, "
                                              r"first 'conv1\.weight'\) that is not the lab"):
        load_checkpoint(tmp_path / "r18.pth")


def test_a_resume_state_loads_as_its_last_epochs_model(tmp_path):
    """``profile checkpoints/*.pth`` meets <stem>.last.pth files; they describe a model too."""
    model = ResNet50(10, small_cfg(2))
    history = {"epoch": [1], "test_acc": [12.5]}
    atomic_torch_save({"kind": "resume", "model": model.state_dict(), "optimizer": {},
                       "epoch": 1, "best_acc": 12.5, "best_epoch": 1, "history": history,
                       "config": {"epochs": 3}, "finished": False}, tmp_path / "x.last.pth")
    ckpt = load_checkpoint(tmp_path / "x.last.pth")
    assert ckpt["cfg"] == model.widths and ckpt["history"] == history
    assert "best_acc" not in ckpt  # the best weights are in x.pth, not here


@pytest.mark.parametrize("field, value, needle", [
    ("history", [1, 2], "history is a list"),
    ("history", {"test_acc": "90"}, "history.test_acc is a str"),
    ("history", {"test_acc": [50.0, "x"]}, r"history.test_acc\[1\] is a str"),
    ("prune", "0.9", "prune is a str"),
    ("prune", {"ratio": 0.9, "threshold": "0.5"}, "prune.threshold is a str"),
    ("num_classes", "10", "num_classes is a str"),
    ("best_acc", [90.0], "best_acc is a list"),
    ("best_epoch", 2.5, "best_epoch is a float"),
    ("config", "lr=0.1", "config is a str"),
])
def test_hand_edited_fields_are_refused_on_load(tmp_path, field, value, needle):
    """info/profile/compare read these fields; an edited file fails in one line at load."""
    path = make_small_checkpoint(tmp_path / "x.pth", width=2)
    ckpt = torch.load(path, weights_only=True)
    ckpt[field] = value
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=f"x.pth: {needle}.*edited or damaged"):
        load_checkpoint(path)


def test_a_non_tensor_in_the_state_dict_is_refused_and_lab_tensor_accuracies_load(tmp_path):
    path = make_small_checkpoint(tmp_path / "x.pth", width=2)
    ckpt = torch.load(path, weights_only=True)
    ckpt["best_acc"] = torch.tensor(91.5)  # what a lab loop may keep
    ckpt["history"] = {"test_acc": [torch.tensor(90.0), 91.5]}
    torch.save(ckpt, path)
    loaded = load_checkpoint(path)  # plain floats from here on (info --json, reports)
    assert loaded["best_acc"] == 91.5 and type(loaded["best_acc"]) is float
    assert loaded["history"]["test_acc"] == [90.0, 91.5]
    assert all(type(x) is float for x in loaded["history"]["test_acc"])
    ckpt["num_classes"] = None  # absent in effect: fc.weight says how many
    torch.save(ckpt, path)
    assert load_checkpoint(path)["num_classes"] == 10
    ckpt["state_dict"]["fc.bias"] = [0.0] * 10
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="state_dict entry 'fc.bias' is a list, not a "
                                              "tensor"):
        load_checkpoint(path)


def test_a_full_disk_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch, capsys):
    """torch.save on a full disk raises RuntimeError('unexpected pos ...') from the ENOSPC."""
    src = make_small_checkpoint(tmp_path / "s.pth", width=2)
    out = tmp_path / "p.pth"
    out.write_bytes(b"the previous file")
    real_save = torch.save

    def save_on_full_disk(obj, fh, *args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")

    monkeypatch.setattr(torch, "save", save_on_full_disk)
    code = run_app(build_app(), ["prune", "--checkpoint", str(src), "--ratio", "0.5",
                                 "--output", str(out), "--no-eval", "--cpu", "--overwrite"])
    monkeypatch.setattr(torch, "save", real_save)
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: the disk is full (No space left on device); free some space")
    assert out.read_bytes() == b"the previous file"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []

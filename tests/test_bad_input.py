"""The "What happens when…" table of docs/reliability.md, row by row, through the real CLI.

Every row runs ``python -m launch ...`` (``tests.helpers.run_cli``: in this process, or a
subprocess where the row says ``process=True``), in a folder of its own holding a small
checkpoint (start.pth) and a fake CIFAR-10 (data/), and must end with exit code 2, exactly one
non-empty stderr line ``error: ...`` naming the problem, no traceback, and every file in the
folder as it was (same names, same bytes). The rows run together (module fixture); each row is
still its own test.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import re
import shutil
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests._faults import env
from tests.fakedata import truncate_file, write_fake_cifar10, write_imagefolder
from tests.helpers import FAST, REPO, make_small_checkpoint, run_cli
from trainer.files.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from trainer.models.resnet import default_widths, prunable_indices

DATA = ["--dataset", "cifar10", "--data-dir", "data", "--no-download"]
FINETUNE = ["finetune", "--checkpoint", "start.pth", *DATA, "--epochs", "1",
            "--output", "out/x.pth", "--plot", "out/x.png", *FAST]
PRUNE = ["prune", "--checkpoint", "start.pth", "--ratio", "0.5", "--no-eval", "--cpu",
         "--output", "out/p.pth"]


def _set(args: list[str], option: str, value: str) -> list[str]:
    """``args`` with ``option``'s value replaced (or the option appended)."""
    args = list(args)
    if option in args:
        args[args.index(option) + 1] = value
        return args
    return [*args, option, value]


class _OpenForWrite:
    """Unpickling it would create a file (``open(target, "w")``)."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


# ------------------------------------------------------------------ row set-ups
# Each gets the row's folder (start.pth, data/ already there) and may add files.


def _random_bytes(d: Path) -> None:
    (d / "bad.pth").write_bytes(os.urandom(4096))


def _truncated(d: Path) -> None:
    shutil.copy(d / "start.pth", d / "bad.pth")
    truncate_file(d / "bad.pth", 0.5)


def _malicious(d: Path) -> None:
    torch.save({"cfg": default_widths(), "state_dict": {}, "x": _OpenForWrite(d / "pwned")},
               d / "bad.pth")


def _cfg_mismatch(d: Path) -> None:
    ckpt = load_checkpoint(d / "start.pth")
    ckpt["cfg"][prunable_indices()[0]] += 4  # the weights still have 4 channels
    save_checkpoint(d / "bad.pth", ckpt)


def _other_arch(d: Path) -> None:
    save_checkpoint(d / "bad.pth", dict(load_checkpoint(d / "start.pth"), arch="alexnet"))


def _gammas_that_empty_a_layer(d: Path) -> None:
    """All BN γ in [0.5, 1.5] except layer1.0.bn1 (1e-3): a small ratio's threshold empties it."""
    from trainer.files.checkpoint import build_model

    model = build_model(load_checkpoint(d / "start.pth"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
        model.layer1[0].bn1.weight.fill_(1e-3)
    save_checkpoint(d / "bad.pth", make_checkpoint(model))


def _no_cifar(d: Path) -> None:
    (d / "empty").mkdir()


def _incomplete_cifar(d: Path) -> None:
    (d / "data" / "cifar-10-batches-py" / "test_batch").unlink()


def _truncated_cifar(d: Path) -> None:
    truncate_file(d / "data" / "cifar-10-batches-py" / "data_batch_3", 0.5)


def _malicious_cifar(d: Path) -> None:
    with open(d / "data" / "cifar-10-batches-py" / "data_batch_2", "wb") as f:
        pickle.dump({"data": _OpenForWrite(d / "pwned"), "labels": []}, f, protocol=2)


def _label_out_of_range(d: Path) -> None:
    path = d / "data" / "cifar-10-batches-py" / "data_batch_4"
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")  # our own fake file: plain arrays and lists
    entry["labels"][3] = 15
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def _empty_imagefolder(d: Path) -> None:
    for split in ("train", "val"):
        for k in range(3):
            (d / "images" / split / f"class{k}").mkdir(parents=True)
    (d / "images" / "train" / "class0" / "notes.txt").write_text("not an image")


def _three_class_imagefolder(d: Path) -> None:
    write_imagefolder(d / "images", classes=3, per_class=2)


def _resume_file_as_input(d: Path) -> None:
    shutil.copy(d / "start.pth", d / "run.last.pth")


def _output_folder(d: Path) -> None:
    (d / "out" / "x.pth").mkdir(parents=True)


def _plots_is_a_file(d: Path) -> None:
    (d / "plots").write_text("not a folder")


def _interrupted_run(d: Path) -> None:
    (d / "out").mkdir()
    # as the same command's run wrote it (its settings match), killed after epoch 1 of 3
    torch.save({"epoch": 1, "finished": False, "config": {"epochs": 3, "lr": 0.001}},
               d / "out" / "x.last.pth")


def _bad_yaml(d: Path) -> None:
    (d / "bad.yaml").write_text("distributed_type: MULTI_GPU\nnum_processes: [2\n")


def _fp8_yaml(d: Path) -> None:
    text = (REPO / "configs" / "accelerate" / "cpu_ddp_2proc.yaml").read_text()
    (d / "bad.yaml").write_text(text.replace("mixed_precision: 'no'", "mixed_precision: fp8"))


# ---- export and .safetensors checkpoints (issue 15)


def _no_onnxruntime(d: Path) -> None:
    """An ``onnxruntime`` package in the row's folder (first on sys.path under ``python -m``)
    that fails to import, as if it were not installed; a *file* named __pycache__ keeps
    Python from writing bytecode beside it (the folder must stay as it was)."""
    (d / "onnxruntime").mkdir()
    (d / "onnxruntime" / "__init__.py").write_text("raise ImportError('not installed')\n")
    (d / "onnxruntime" / "__pycache__").write_text("")


def _safetensors_with(d: Path, **changes) -> None:
    from trainer.files.safetensors_io import save_safetensors

    save_safetensors(d / "bad.safetensors", {**load_checkpoint(d / "start.pth"), **changes})


def _safetensors_wrong_widths(d: Path) -> None:
    cfg = load_checkpoint(d / "start.pth")["cfg"]
    cfg[prunable_indices()[0]] += 4  # the weights still have 4 channels
    _safetensors_with(d, cfg=cfg)


def _seven_class_teacher(d: Path) -> None:
    make_small_checkpoint(d / "t7.pth", num_classes=7)


def _budget(value: str) -> list[str]:
    """prune to a params budget instead of a ratio."""
    args = [a for a in PRUNE]
    at = args.index("--ratio")
    return [*args[:at], "--target-params", value, *args[at + 2:]]


def _safetensors_unknown_arch(d: Path) -> None:
    _safetensors_with(d, arch="alexnet")


def _safetensors_junk(d: Path) -> None:
    (d / "bad.safetensors").write_bytes(os.urandom(4096))


EXPORT = ["export", "start.pth", "--format"]


@dataclass(frozen=True)
class Row:
    id: str
    case: str  # the docs/reliability.md row: "What happens when …"
    args: list[str]
    needle: str  # regex the error line must match (names the problem)
    setup: Callable[[Path], None] | None = None
    gpu_free: bool = False  # only meaningful on a machine without CUDA GPUs
    absent: str | None = None  # only meaningful where this module is not installed
    process: bool = False  # needs a fresh interpreter (e.g. a module shadowed from its folder)


CORE_ROWS = [
    Row("ckpt-missing", "the checkpoint does not exist",
        _set(FINETUNE, "--checkpoint", "nope.pth"), r"nope\.pth does not exist"),
    Row("ckpt-folder", "the checkpoint path is a folder",
        _set(FINETUNE, "--checkpoint", "data"), r"data is a folder"),
    Row("ckpt-unreadable", "the checkpoint cannot be read (I/O error; or no read permission)",
        _set(FINETUNE, "--checkpoint", "/proc/self/mem"), r"mem cannot be read"),
    Row("ckpt-truncated", "the checkpoint is truncated (partial copy or download)",
        _set(FINETUNE, "--checkpoint", "bad.pth"), r"bad\.pth is truncated or corrupt",
        _truncated),
    Row("ckpt-random-bytes", "the checkpoint is not a torch file (random bytes)",
        _set(FINETUNE, "--checkpoint", "bad.pth"), r"bad\.pth is not a (valid )?torch",
        _random_bytes),
    Row("ckpt-malicious", "unpickling the checkpoint would run code (create a file)",
        _set(FINETUNE, "--checkpoint", "bad.pth"), r"bad\.pth was refused.*not run",
        _malicious),
    Row("ckpt-cfg-mismatch", "the checkpoint's cfg and state_dict disagree",
        _set(FINETUNE, "--checkpoint", "bad.pth"), r"cfg and state_dict disagree",
        _cfg_mismatch),
    Row("ckpt-unknown-arch", "the checkpoint names an architecture slimtune does not know",
        _set(FINETUNE, "--checkpoint", "bad.pth"),
        r"names the architecture 'alexnet', which slimtune does not know; it slims resnet50",
        _other_arch),
    Row("ratio-zero", "--ratio 0", _set(PRUNE, "--ratio", "0"),
        r"--ratio 0\.0 is outside \(0, 1\)"),
    Row("ratio-one", "--ratio 1", _set(PRUNE, "--ratio", "1"), r"--ratio 1\.0 is outside \(0, 1\)"),
    Row("ratio-empties-layer", "the ratio would remove every channel of a layer "
        "(--min-channels 0)", [*_set(_set(PRUNE, "--checkpoint", "bad.pth"), "--ratio", "0.005"),
                               "--min-channels", "0"],
        r"removes every channel of layer1\.0\.bn1", _gammas_that_empty_a_layer),
    Row("epochs-zero", "--epochs 0", _set(FINETUNE, "--epochs", "0"),
        r"--epochs 0: need at least 1"),
    Row("threads-zero", "--threads 0", [*FINETUNE, "--threads", "0"],
        r"--threads 0: use 1 or more \(threads per process\)"),
    Row("lr-negative", "a negative learning rate", _set(FINETUNE, "--lr", "-0.1"),
        r"--lr -0\.1: the learning rate must be a positive number"),
    Row("batch-indivisible", "the batch does not split over the processes",
        [*_set(FINETUNE, "--batch-size", "15"), "--gpus", "2"],
        r"--batch-size 15 does not split evenly over 2 processes"),
    Row("too-many-gpus", "more GPUs asked for than the machine has",
        [*[a for a in FINETUNE if a != "--cpu"], "--gpus", "64"], r"--gpus 64 but"),
    Row("gpus-on-cpu-machine", "GPUs asked for on a machine without one",
        [*[a for a in FINETUNE if a != "--cpu"], "--gpus", "2"],
        r"no CUDA GPU is visible.*--cpu", gpu_free=True),
    Row("data-missing", "the dataset is not in --data-dir (download off)",
        _set(FINETUNE, "--data-dir", "empty"), r"CIFAR-10 not found in empty", _no_cifar),
    Row("data-incomplete", "a CIFAR file is missing", FINETUNE,
        r"is incomplete \(no test_batch\)", _incomplete_cifar),
    Row("data-truncated", "a CIFAR file is truncated", FINETUNE,
        r"data_batch_3 is truncated or corrupt", _truncated_cifar),
    Row("data-malicious", "a CIFAR file would run code when unpickled", FINETUNE,
        r"data_batch_2 holds objects other than arrays", _malicious_cifar),
    Row("cifar-label-out-of-range", "a CIFAR file has a label outside the classes",
        FINETUNE, r"data_batch_4 has a label 15 outside 0\.\.9", _label_out_of_range),
    Row("imagefolder-empty", "an image folder with no images",
        _set(_set(FINETUNE, "--dataset", "imagefolder"), "--data-dir", "images"),
        r"no usable images in images/train", _empty_imagefolder),
    Row("imagefolder-classes", "an image folder whose class count differs from the checkpoint",
        _set(_set(FINETUNE, "--dataset", "imagefolder"), "--data-dir", "images"),
        r"has 3 classes but checkpoint start\.pth has 10", _three_class_imagefolder),
    Row("output-under-file", "the output folder cannot be created (a file is in the way)",
        _set(FINETUNE, "--output", "start.pth/x.pth"), r"cannot write to start\.pth"),
    Row("output-is-input", "the output path is the input checkpoint",
        _set(FINETUNE, "--output", "start.pth"), r"--output start\.pth is the input checkpoint"),
    Row("prune-plots-under-file", "prune's plots folder cannot be created (a file is in the way)",
        PRUNE, r"cannot write to plots \(File exists\)", _plots_is_a_file),
    Row("plot-is-input", "the figure path is the input checkpoint",
        _set(FINETUNE, "--plot", "start.pth"), r"--plot start\.pth is the input checkpoint"),
    Row("resume-file-is-input", "the run's resume file would be the input checkpoint",
        _set(_set(FINETUNE, "--checkpoint", "run.last.pth"), "--output", "run.pth"),
        r"resume file of --output run\.pth: run\.last\.pth is the input checkpoint",
        _resume_file_as_input),
    Row("compare-output-is-input", "compare's figure path is one of the checkpoints",
        ["compare", "start.pth", "start.pth", "--output", "start.pth"],
        r"--output start\.pth is one of the checkpoints compared"),
    Row("output-is-folder", "the output path is a folder",
        FINETUNE, r"--output out/x\.pth is a folder; give a file path", _output_folder),
    Row("scope-unknown", "an unknown --scope",
        ["pipeline", "--scope", "foo", "--dataset", "synthetic", "--cpu"],
        r"--scope 'foo': use all or prunable"),
    Row("cli-unknown-command", "a mistyped command", ["trian"],
        r"No such command 'trian'"),
    Row("cli-unknown-option", "a mistyped option", [*FINETUNE, "--epoch", "2"],
        r"No such option:? '?--epoch\b.*--epochs"),
    Row("cli-bad-value", "an option value of the wrong type", _set(FINETUNE, "--epochs", "abc"),
        r"Invalid value for '--epochs'"),
    Row("cli-missing-argument", "a command without its required argument", ["info"],
        r"(?i)Missing argument 'checkpoint'"),
    Row("dp-compile", "DataParallel with --compile (or --mixed-precision)",
        ["finetune", "--checkpoint", "start.pth", *DATA, "--gpus", "2", "--mode", "dp",
         "--compile"], r"--mode dp runs in FP32 without --compile"),
    Row("forgotten-resume", "a fresh start where an interrupted run's resume state lies",
        _set(FINETUNE, "--epochs", "3"),
        r"out/x\.last\.pth holds an interrupted run \(1 of 3 epochs done\); add --resume",
        _interrupted_run),
    Row("tracker-missing", "--log-with names a tracker that is not installed",
        [*FINETUNE, "--log-with", "mlflow"], r"--log-with mlflow: mlflow is not installed",
        absent="mlflow"),
    Row("ratios-empty", "pipeline --ratios is empty",
        ["pipeline", "--ratios", "", "--dataset", "synthetic", "--cpu"], r"--ratios is empty"),
    Row("ratios-twice", "pipeline --ratios names a ratio twice",
        ["pipeline", "--ratios", "0.5,0.9,0.50", "--dataset", "synthetic", "--cpu"],
        r"--ratios lists 0\.5 twice"),
    Row("config-unwritable", "config --output cannot be written",
        ["config", "--gpus", "2", "--output", "start.pth/x.yaml"],
        r"cannot write the Accelerate config start\.pth/x\.yaml"),
    Row("accelerate-yaml-malformed", "a malformed --accelerate-config YAML",
        [*FINETUNE, "--accelerate-config", "bad.yaml"], r"bad\.yaml is not valid YAML",
        _bad_yaml),
    Row("accelerate-yaml-bad-value", "an --accelerate-config YAML value slimtune cannot run "
        "(e.g. mixed_precision: fp8)", [*FINETUNE, "--accelerate-config", "bad.yaml"],
        r"bad\.yaml: mixed_precision 'fp8' is not supported", _fp8_yaml),
    Row("accelerate-yaml-gpus-on-cpu-machine", "an --accelerate-config for GPUs on a machine "
        "without one", [*[a for a in FINETUNE if a != "--cpu"], "--accelerate-config",
                        str(REPO / "configs" / "accelerate" / "ddp_2gpu.yaml")],
        r"ddp_2gpu\.yaml asks for 2 GPUs but no CUDA GPU is visible.*--cpu", gpu_free=True),
    Row("export-onnx-not-installed", "export --format onnx without the export extra (onnx, "
        "onnxruntime)", [*EXPORT, "onnx"], r"--format onnx needs onnx and onnxruntime, and "
        r"(onnx and )?onnxruntime (is|are) not installed; pip install -e \"\.\[export\]\"",
        _no_onnxruntime, process=True),
    Row("export-unknown-format", "an unknown export --format", [*EXPORT, "pdf"],
        r"--format 'pdf': use onnx, torchscript or safetensors"),
    Row("export-output-is-input", "export's --output is the input checkpoint",
        [*EXPORT, "safetensors", "--output", "start.pth"],
        r"--output start\.pth is the input checkpoint"),
    Row("export-output-is-folder", "export's --output is a folder",
        [*EXPORT, "safetensors", "--output", "data"], r"--output data is a folder"),
    Row("export-batch-and-dynamic", "export with both --batch-size and --dynamic-batch",
        [*EXPORT, "onnx", "--batch-size", "8", "--dynamic-batch"],
        r"--batch-size 8 fixes the batch and --dynamic-batch frees it"),
    Row("safetensors-wrong-widths", "a .safetensors checkpoint whose header widths do not match "
        "its weights", _set(FINETUNE, "--checkpoint", "bad.safetensors"),
        r"cfg and state_dict disagree", _safetensors_wrong_widths),
    Row("safetensors-unknown-arch", "a .safetensors checkpoint whose header names an unknown "
        "architecture", _set(FINETUNE, "--checkpoint", "bad.safetensors"),
        r"names the architecture 'alexnet', which slimtune does not know",
        _safetensors_unknown_arch),
    Row("safetensors-junk", "a .safetensors checkpoint that is not a safetensors file",
        _set(FINETUNE, "--checkpoint", "bad.safetensors"),
        r"bad\.safetensors is not a valid safetensors file", _safetensors_junk),
    Row("arch-unknown", "--arch names an architecture slimtune does not know",
        ["train", "--arch", "alexnet", "--dataset", "synthetic", "--cpu"],
        r"--arch 'alexnet' is unknown; use one of resnet50, .* or torchvision:NAME"),
    Row("arch-torchvision-not-classification", "--arch torchvision:NAME that is not a "
        "classification CNN", ["train", "--arch", "torchvision:fasterrcnn_resnet50_fpn",
                               "--dataset", "synthetic", "--cpu", "--epochs", "1",
                               "--synthetic-train", "16", "--synthetic-test", "8"],
        r"'fasterrcnn_resnet50_fpn' is not a torchvision classification model"),
    Row("prune-ratio-and-budget", "prune with both --ratio and a budget",
        [*PRUNE, "--target-params", "1M"],
        r"--ratio and --target-params both say how much to prune; give one"),
    Row("budget-bad-count", "a budget that is not a count", _budget("4X"),
        r"--target-params '4X' is not a positive count; write e\.g\. 4M"),
    Row("budget-cannot-be-met", "a budget below what --min-channels keeps", _budget("1K"),
        r"--target-params 1K cannot be met: with every prunable layer at its floor"),
    Row("budget-already-met", "a budget the unpruned model already meets", _budget("1G"),
        r"--target-params 1G: the unpruned model already has .* params; nothing to prune"),
    Row("kd-alpha-out-of-range", "--kd-alpha outside [0, 1]", [*FINETUNE, "--kd-alpha", "1.5"],
        r"--kd-alpha 1\.5: must be in \[0, 1\]"),
    Row("kd-temperature-zero", "--kd-temperature 0", [*FINETUNE, "--kd-temperature", "0"],
        r"--kd-temperature 0\.0: must be above 0"),
    Row("teacher-other-classes", "a --teacher with another number of classes",
        [*FINETUNE, "--teacher", "t7.pth"],
        r"--teacher t7\.pth has 7 classes but the model fine-tuned has 10", _seven_class_teacher),
    Row("sync-bn-on-cpu", "--sync-bn with --cpu", [*FINETUNE, "--sync-bn"],
        r"--sync-bn synchronises BatchNorm over GPU processes and needs CUDA"),
    Row("latency-unknown-runtime", "an unknown profile --runtime",
        ["profile", "start.pth", "--latency", "--runtime", "tensorrt"],
        r"--runtime 'tensorrt': use torch or onnxruntime"),
    Row("latency-cuda-on-cpu-machine", "profile --latency --device cuda on a machine without a GPU",
        ["profile", "start.pth", "--latency", "--device", "cuda"],
        r"--device cuda but no CUDA GPU is visible on this machine; use --device cpu",
        gpu_free=True),
]

# Rows of later work, each in its own list (issue 21: files, locks, bounds; 22: user models and
# pretrained weights; 23: many jobs; 24: criteria and baselines).
# ---- issue 21: special files, clobbering, bounded messages, start-up checks


def _char_device(d: Path, name: str = "mynull") -> None:
    """A node like /dev/null (major 1, minor 3) in the row's folder; a FIFO where this user
    may not make device nodes (not root)."""
    try:
        os.mknod(d / name, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        os.mkfifo(d / name)


def _csv_is_a_fifo(d: Path) -> None:
    (d / "out").mkdir()
    os.mkfifo(d / "out" / "x_metrics.csv")


def _copy_of_start(d: Path, name: str) -> None:
    shutil.copy(d / "start.pth", d / name)


def _finished_run(d: Path) -> None:
    (d / "out").mkdir()
    shutil.copy(d / "start.pth", d / "out" / "x.pth")
    # as the same command's run wrote it, all its epochs done
    torch.save({"kind": "resume", "epoch": 1, "finished": True, "best_acc": 20.0, "best_epoch": 1,
                "config": {"epochs": 1, "lr": 0.001}}, d / "out" / "x.last.pth")


def _earlier_study(d: Path) -> None:
    (d / "w" / "checkpoints").mkdir(parents=True)
    shutil.copy(d / "start.pth", d / "w" / "checkpoints" / "model_sparse.pth")


def _yaml_bomb(d: Path) -> None:
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    (d / "bomb.yaml").write_text("\n".join(lines) + "\ndistributed_type: *i\n")


def _arch_is(value) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        ckpt = torch.load(d / "start.pth", weights_only=True)
        torch.save({**ckpt, "arch": value}, d / "bad.pth")
    return setup


def _torchvision_without_bn(d: Path) -> None:
    torch.save({**torch.load(d / "start.pth", weights_only=True), "arch": "torchvision:alexnet",
                "cfg": []}, d / "bad.pth")


def _deep_safetensors_cfg(d: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(d / "bad.safetensors"),
              metadata={"arch": "resnet50", "num_classes": "10", "cfg": "[" * 5000 + "]" * 5000})


def _vgg(d: Path) -> None:
    from trainer.models.build import fresh_model

    torch.manual_seed(0)
    save_checkpoint(d / "vgg.pth", make_checkpoint(fresh_model("vgg11", 10, 0.5)))


def _one_empty_class(d: Path) -> None:
    write_imagefolder(d / "images", classes=10, per_class=2)
    for split in ("train", "val"):
        shutil.rmtree(d / "images" / split / "class3")
        (d / "images" / split / "class3").mkdir()


def _zip_bomb(d: Path) -> None:
    """A torch.save file re-zipped with deflate: 64 MB of zeros in a file of some 70 KB."""
    import io
    import zipfile

    raw = io.BytesIO()
    torch.save({"cfg": default_widths(), "state_dict": {"pad": torch.zeros(16 << 20)}}, raw)
    with zipfile.ZipFile(raw) as src, zipfile.ZipFile(d / "bad.pth", "w",
                                                      zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            out.writestr(info.filename, src.read(info.filename))


ROWS_FILES: list[Row] = [
    Row("output-is-a-device", "the output is a character device or FIFO (e.g. /dev/null)",
        _set(PRUNE, "--output", "mynull"),
        r"--output mynull is a (character device|FIFO \(named pipe\)), not a regular file",
        _char_device),
    Row("csv-is-a-fifo", "the run's metrics CSV path is a FIFO", FINETUNE,
        r"the metrics CSV of --output out/x\.pth: out/x_metrics\.csv is a FIFO", _csv_is_a_fifo),
    Row("export-over-a-checkpoint", "export's --output holds a checkpoint",
        [*EXPORT, "torchscript", "--output", "keep.pth"],
        r"--output keep\.pth is a torch checkpoint; slimtune never replaces a checkpoint",
        lambda d: _copy_of_start(d, "keep.pth")),
    Row("compare-over-a-checkpoint", "compare's figure path holds a checkpoint (whatever its name)",
        ["compare", "start.pth", "--output", "figure.png"],
        r"--output figure\.png is a torch checkpoint; slimtune never replaces a checkpoint",
        lambda d: _copy_of_start(d, "figure.png")),
    Row("config-over-a-resume-state", "config --output holds a resume state",
        ["config", "--gpus", "2", "--cpu", "--output", "run.last.pth"],
        r"--output run\.last\.pth is a torch checkpoint; slimtune never replaces",
        lambda d: _copy_of_start(d, "run.last.pth")),
    Row("finished-run-again", "a new run where a finished run's results lie (no --resume, "
        "no --overwrite)", FINETUNE,
        r"out/x\.pth holds a finished run \(1 of 1 epochs, best 20\.00% at epoch 1\); add "
        r"--resume to continue it, give another --output to keep both, or add --overwrite",
        _finished_run),
    Row("prune-output-exists", "prune --output names an existing file (no --overwrite)",
        PRUNE, r"--output out/p\.pth already exists; give another --output to keep both, or add "
        r"--overwrite", lambda d: (d / "out").mkdir() or _copy_of_start(d, "out/p.pth")),
    Row("pipeline-earlier-study", "pipeline --workdir holds an earlier study (no --resume, no "
        "--overwrite)", ["pipeline", "--dataset", "synthetic", "--cpu", "--workdir", "w"],
        r"--workdir w holds an earlier study \(model_sparse\.pth\); add --resume", _earlier_study),
    Row("output-name-too-long", "an --output name longer than the file system allows",
        _set(FINETUNE, "--output", "a" * 300 + ".pth"),
        r"--output 'a{10}.*\(306 characters\) has a name of 304 bytes; this file system allows"),
    Row("accelerate-yaml-aliases", "an --accelerate-config YAML with aliases (a billion laughs)",
        [*FINETUNE, "--accelerate-config", "bomb.yaml"],
        r"bomb\.yaml uses a YAML alias \(\*a on line 2\), which slimtune does not expand",
        _yaml_bomb),
    Row("ckpt-arch-not-a-name", "the checkpoint's arch is not a name (an int or a list)",
        _set(FINETUNE, "--checkpoint", "bad.pth"),
        r"bad\.pth: the checkpoint's arch is 7 \(an int\), not an architecture name", _arch_is(7)),
    Row("ckpt-arch-too-long", "the checkpoint's arch is a 10,000-character name",
        _set(FINETUNE, "--checkpoint", "bad.pth"),
        r"names the architecture 'x{59}\.\.\. \(10,002 characters\), which slimtune does not",
        _arch_is("x" * 10_000)),
    Row("ckpt-arch-without-bn", "the checkpoint names a torchvision model without BatchNorm",
        _set(FINETUNE, "--checkpoint", "bad.pth"),
        r"bad\.pth: the checkpoint's arch torchvision:alexnet has no BatchNorm2d layers",
        _torchvision_without_bn),
    Row("safetensors-deep-cfg", "a .safetensors checkpoint whose cfg nests thousands deep",
        _set(FINETUNE, "--checkpoint", "bad.safetensors"),
        r"the safetensors header field 'cfg' nests deeper than 32 levels", _deep_safetensors_cfg),
    Row("ckpt-zip-bomb", "a checkpoint that would unpack to far more than its size",
        _set(FINETUNE, "--checkpoint", "bad.pth"),
        r"checkpoint bad\.pth was refused: its \d+ compressed part\(s\) would unpack to 67 "
        r"MB from a 0\.\d MB file", _zip_bomb),
    Row("image-size-too-small", "train at an --image-size too small for the architecture",
        ["train", "--arch", "vgg11", "--image-size", "16", "--dataset", "synthetic", "--cpu",
         "--epochs", "1", "--synthetic-train", "16", "--synthetic-test", "8", "--output",
         "out/v.pth"], r"--image-size 16 is too small for vgg11 \(.*\); use --image-size 32 or "
        r"more"),
    Row("input-size-too-small", "profile --input-size below what the architecture runs at",
        ["profile", "vgg.pth", "--input-size", "1"],
        r"--input-size 1 is too small for vgg11 \(.*\); use --input-size 32 or more", _vgg),
    Row("latency-batch-too-big", "profile --latency with a batch larger than the memory",
        ["profile", "start.pth", "--latency", "--device", "cpu", "--batch-sizes", "100000000"],
        r"--batch-sizes 100000000: a batch of 100,000,000 images of 3×32×32 needs at least .* "
        r"GB on cpu and .* GB are free \(out of memory\)"),
    Row("cpu-processes-too-many", "more CPU processes than the machine can run",
        [*FINETUNE, "--gpus", "100000"],
        r"--gpus 100000 with --cpu starts 100,000 CPU processes, more than this machine's \d+ "
        r"CPU cores can run"),
    Row("min-channels-keeps-all", "--min-channels (or --round-to) at least the widest pruned "
        "layer", [*PRUNE, "--min-channels", "100000"],
        r"--min-channels 100000 keeps every channel: the widest pruned layer of this resnet50 "
        r"has \d+; nothing would be pruned"),
    Row("imagefolder-empty-class", "an image folder with one empty class",
        _set(_set(FINETUNE, "--dataset", "imagefolder"), "--data-dir", "images"),
        r"no usable images in images/train/class3, while the other classes have some",
        _one_empty_class),
]
# ---- issue 22: the user's own models (--arch module.path:factory)
USER_TRAIN = ["train", "--dataset", "synthetic", "--synthetic-train", "20", "--synthetic-test",
              "10", "--image-size", "16", "--epochs", "1", "--cpu", "--output", "out/u.pth"]


def _user_model_file(d: Path) -> None:
    """A file of the user's model, whose module (here, on the path) would leave ``pwned``."""
    (d / "pwnmod.py").write_text(f"open({str(d / 'pwned')!r}, 'w').close()\n"
                                 "def make_net(num_classes):\n    raise SystemExit(3)\n")
    torch.save({"format_version": 1, "arch": "pwnmod:make_net", "num_classes": 10, "cfg": [],
                "state_dict": {"w": torch.zeros(1)}}, d / "user.pth")


def _stdlib_model_file(d: Path) -> None:
    torch.save({"format_version": 1, "arch": "os:system", "num_classes": 10, "cfg": [],
                "state_dict": {"w": torch.zeros(1)}}, d / "bad.pth")


# ---- issue 22: timm models and published weights (--arch timm:NAME, train --init FILE)
TIMM_TRAIN = ["train", "--dataset", "synthetic", "--synthetic-train", "20", "--synthetic-test",
              "10", "--image-size", "32", "--epochs", "1", "--cpu", "--output", "out/t.pth"]


def _no_timm(d: Path) -> None:
    """A ``timm`` package in the row's folder that fails to import, as if it were not
    installed (see _no_onnxruntime)."""
    (d / "timm").mkdir()
    (d / "timm" / "__init__.py").write_text("raise ImportError('not installed')\n")
    (d / "timm" / "__pycache__").write_text("")


def _odd_resnet18_weights(d: Path) -> None:
    """A plain torchvision resnet18 state_dict (1000 classes) with one layer of another shape."""
    import torchvision

    state = torchvision.models.resnet18(num_classes=1000).state_dict()
    state["layer2.0.conv1.weight"] = torch.zeros(64, 64, 3, 3)  # resnet18's has 128 filters
    torch.save(state, d / "odd.pth")


ROWS_MODELS: list[Row] = [
    Row("user-model-without-arch", "a file of your own model, without --arch naming it",
        _set(FINETUNE, "--checkpoint", "user.pth"),
        r"user\.pth holds a model of your own code \('pwnmod:make_net'\); slimtune imports no "
        r"code because a file names it: .*--arch pwnmod:make_net", _user_model_file),
    Row("user-model-stdlib", "the checkpoint names Python's standard library as its model "
        "(os:system)", _set(FINETUNE, "--checkpoint", "bad.pth"),
        r"bad\.pth: the checkpoint's arch 'os:system' names Python's standard library \(os\)",
        _stdlib_model_file),
    Row("arch-user-dotdot", "--arch is not a module.path:factory name (a path with ..)",
        [*USER_TRAIN, "--arch", "../evil:make"],
        r"--arch '\.\./evil:make' is not a module\.path:factory name"),
    Row("arch-user-long", "--arch of your own model 10,000 characters long",
        [*USER_TRAIN, "--arch", "m:" + "f" * 10_000],
        r"--arch 'm:fff.*\(10,004 characters\) is too long for a module\.path:factory name"),
    Row("arch-user-no-module", "--arch names a module that cannot be imported",
        [*USER_TRAIN, "--arch", "no_such_module_22:make_net"],
        r"--arch no_such_module_22:make_net: cannot import no_such_module_22 .*PYTHONPATH"),
    Row("timm-not-installed", "--arch timm:NAME without the timm extra",
        [*TIMM_TRAIN, "--arch", "timm:resnet18"],
        r"--arch timm:NAME needs the timm package, which is not installed; install the extra: "
        r"pip install \"slimtune\[timm\]\"", _no_timm, process=True),
    Row("timm-no-batchnorm", "--arch timm:NAME of a model without BatchNorm (ConvNeXt)",
        [*TIMM_TRAIN, "--arch", "timm:convnext_atto"],
        r"--arch timm:convnext_atto has no BatchNorm2d layers \(its norms: LayerNorm2d"),
    Row("timm-untraceable", "--arch timm:NAME of a model Torch-Pruning cannot trace",
        [*TIMM_TRAIN, "--arch", "timm:cs3darknet_s"],
        r"timm:cs3darknet_s: Torch-Pruning cannot trace it at 32x32 \(TypeError"),
    Row("init-layer-mismatch", "train --init with weights whose layers (other than the "
        "classifier) do not fit --arch", [*TIMM_TRAIN, "--arch", "torchvision:resnet18",
                                          "--init", "odd.pth"],
        r"odd\.pth: layer2\.0\.conv1\.weight has shape \(64, 64, 3, 3\) but an unpruned "
        r"torchvision:resnet18 has \(128, 64, 3, 3\)", _odd_resnet18_weights),
    Row("augment-unknown", "an unknown --augment", [*TIMM_TRAIN, "--augment", "autoaugment"],
        r"--augment 'autoaugment': use auto, cifar, imagenet or none"),
]
STUDY = ["pipeline", "--dataset", "synthetic", "--cpu", "--workdir", "w"]
SWEEP = ["sweep", "--dataset", "synthetic", "--cpu", "--workdir", "w"]
ROWS_JOBS: list[Row] = [
    Row("gpus-per-job-over-gpus", "pipeline --gpus-per-job larger than --gpus",
        ["pipeline", "--dataset", "synthetic", "--gpus", "2", "--gpus-per-job", "4",
         "--workdir", "w"],
        r"--gpus-per-job 4 is more than the 2 GPUs of --gpus; .* use --gpus-per-job 2 or fewer"),
    Row("sweep-empty-grid", "sweep with an empty list of values", [*SWEEP, "--sparsity", ","],
        r"--sparsity is empty; give one or more comma-separated values, e\.g\. --sparsity "
        r"1e-5,1e-4"),
    Row("sweep-nothing-varies", "sweep without a setting of several values",
        [*SWEEP, "--sparsity", "1e-4"], r"sweep needs a setting with several values"),
    Row("sweep-unknown-setting", "sweep over a setting it does not vary",
        [*SWEEP, "--batch-size", "16,32"],
        r"--batch-size '16,32' lists several values, but a sweep varies only --sparsity, "
        r"--train-lr, .*; give --batch-size one value"),
]
SCRATCH = ["train", "--scratch-from", "start.pth", "--dataset", "synthetic", "--cpu",
           "--epochs", "1", "--output", "out/s.pth"]
ROWS_CRITERIA: list[Row] = [
    Row("criterion-unknown", "an unknown prune --criterion", [*PRUNE, "--criterion", "l3"],
        r"--criterion 'l3': use bn, l1, l2, random or taylor"),
    Row("allocation-unknown", "an unknown prune --allocation", [*PRUNE, "--allocation", "even"],
        r"--allocation 'even': use global or uniform"),
    Row("taylor-batches-zero", "--taylor-batches 0", [*PRUNE, "--taylor-batches", "0"],
        r"--taylor-batches 0: need at least 1"),
    Row("taylor-without-data", "prune --criterion taylor without the training data",
        [*PRUNE, "--criterion", "taylor", "--data-dir", "empty", "--no-download"],
        r"--criterion taylor scores channels on training batches, and .*cifar-10", _no_cifar),
    Row("bn-recalibrate-negative", "--bn-recalibrate below 0", [*PRUNE, "--bn-recalibrate", "-1"],
        r"--bn-recalibrate -1: must be 0 \(off\) or more batches"),
    Row("scratch-without-from", "train --scratch without --scratch-from",
        ["train", "--scratch", "B", "--dataset", "synthetic", "--cpu"],
        r"--scratch B needs --scratch-from CKPT"),
    Row("scratch-unknown", "an unknown train --scratch", [*SCRATCH, "--scratch", "C"],
        r"--scratch 'C': use E \(the same epochs\) or B"),
    Row("scratch-and-init", "train with both --scratch-from and --init",
        [*SCRATCH, "--init", "start.pth"],
        r"--init and --scratch-from both say where the model starts; give one"),
    Row("scratch-with-sparsity", "train --scratch-from with --sparsity",
        [*SCRATCH, "--sparsity", "1e-4"], r"--scratch-from trains without sparsity"),
    Row("scratch-other-arch", "train --scratch-from a file of another architecture than --arch",
        [*SCRATCH, "--arch", "vgg11"],
        r"--scratch-from start\.pth is a resnet50 and --arch is vgg11; add --arch resnet50"),
    Row("scratch-unpruned", "train --scratch-from a checkpoint that was never pruned",
        ["train", "--scratch-from", "vgg.pth", "--arch", "vgg11", "--dataset", "synthetic",
         "--synthetic-train", "64", "--synthetic-test", "32", "--cpu", "--epochs", "1",
         "--output", "out/s.pth"],
        r"--scratch-from vgg\.pth has the unpruned architecture of vgg11 .*give a pruned "
        r"checkpoint", _vgg),
    Row("criteria-unknown", "an unknown criterion in pipeline --criteria",
        [*STUDY, "--criteria", "bn,l3"], r"--criteria 'l3': use bn, l1, l2, random or taylor"),
    Row("criteria-twice", "pipeline --criteria lists a criterion twice",
        [*STUDY, "--criteria", "bn,l1,bn"], r"--criteria lists bn twice; give each once"),
    Row("criteria-empty", "pipeline --criteria is empty", [*STUDY, "--criteria", ","],
        r"--criteria is empty; give at least one"),
    Row("allocations-unknown", "an unknown allocation in pipeline --allocations",
        [*STUDY, "--allocations", "global,even"], r"--allocations 'even': use global or uniform"),
    Row("pipeline-scratch-unknown", "an unknown pipeline --scratch", [*STUDY, "--scratch", "C"],
        r"--scratch 'C': use E \(the same epochs\) or B"),
]
ROWS = CORE_ROWS + ROWS_FILES + ROWS_MODELS + ROWS_JOBS + ROWS_CRITERIA


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    before: dict[str, str]
    after: dict[str, str]
    folder: Path


def _prepare(row: Row, template: Path, root: Path) -> Path:
    folder = root / row.id
    shutil.copytree(template, folder)
    if row.setup:
        row.setup(folder)
    return folder


def _run_row(row: Row, folder: Path) -> Outcome:
    before = _snapshot(folder)
    result = run_cli(*row.args, cwd=folder, env=env(), timeout=180, process=row.process)
    return Outcome(result.returncode, result.stdout, result.stderr, before, _snapshot(folder),
                   folder)


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory) -> dict[str, Outcome]:
    """Run the selected rows: one after another in this process (a row takes well under a
    second once the imports are paid), meanwhile the few that need a process in threads."""
    wanted = {item.callspec.params["row"].id for item in request.session.items
              if item.originalname == "test_bad_input_row" and hasattr(item, "callspec")}
    root = tmp_path_factory.mktemp("bad_input")
    template = root / "_template"
    template.mkdir()
    make_small_checkpoint(template / "start.pth")
    write_fake_cifar10(template / "data")
    rows = [r for r in ROWS if r.id in wanted]
    folders = {r.id: _prepare(r, template, root) for r in rows}
    with ThreadPoolExecutor(max_workers=2) as pool:
        started = {r.id: pool.submit(_run_row, r, folders[r.id]) for r in rows if r.process}
        done = {r.id: _run_row(r, folders[r.id]) for r in rows if not r.process}
        return done | {row_id: future.result() for row_id, future in started.items()}


@pytest.mark.slow  # ~60-90 s for all rows together on a busy 2-core machine
@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_row(row: Row, outcomes: dict[str, Outcome]):
    if row.gpu_free and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    if row.absent and importlib.util.find_spec(row.absent):
        pytest.skip(f"{row.absent} is installed here")
    out = outcomes[row.id]
    assert out.code == 2, (out.code, out.stderr[-3000:])
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-3000:]
    assert re.search(row.needle, lines[0]), lines[0]
    assert "Traceback" not in out.stdout + out.stderr
    assert out.after == out.before, "files changed or appeared"
    assert not (out.folder / "pwned").exists()


def test_every_row_has_a_unique_id_and_case():
    assert len({r.id for r in ROWS}) == len(ROWS) == len({r.case for r in ROWS})


def test_reliability_doc_table_has_every_row():
    """The "What happens when…" table of docs/reliability.md and ROWS stay in step."""
    doc = (REPO / "docs" / "reliability.md").read_text()
    missing = [r.case for r in ROWS if f"| {r.case} |" not in doc]
    assert not missing, f"docs/reliability.md table lacks: {missing}"

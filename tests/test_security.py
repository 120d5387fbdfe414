"""Nothing in the project runs code from a user's file, and no command goes through a shell.

The source check parses every module of launch/, trainer/ and bench/ (not tests) and refuses:
``pickle.load`` / ``loads`` / ``Unpickler`` (one exception:
trainer.data.cifar._ArrayUnpickler, whose
allow-list is pinned and attacked below), ``eval`` / ``exec``, ``torch.load`` without
``weights_only=True``, any ``weights_only=False``, widening the weights_only allow-list
(``add_safe_globals``), ``yaml.load`` / ``unsafe_load`` / ``full_load``, ``shell=True``,
``os.system`` / ``os.popen``. Parsing (not grepping) keeps comments and ``model.eval()`` out.
"""

from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from tests.fakedata import write_fake_cifar10
from tests.helpers import REPO
from trainer.data import cifar as data
from trainer.data.datasets import build_datasets
from trainer.errors import DataError

SOURCE_DIRS = ("launch", "trainer", "bench")
# The one allowed use: trainer/data/cifar.py subclasses pickle.Unpickler to read CIFAR's pickles
# with an allow-list of numpy globals (pinned in test_cifar_unpickler_allow_list_is_pinned).
ALLOWED = {("trainer/data/cifar.py", "class _ArrayUnpickler(pickle.Unpickler)")}


def _sources() -> list[Path]:
    files = [p for d in SOURCE_DIRS if (REPO / d).is_dir() for p in (REPO / d).rglob("*.py")]
    assert len(files) > 10
    return sorted(files)


def _dotted(node: ast.AST) -> str:
    """'pickle.load' for Attribute(Name('pickle'), 'load'); '' for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


BANNED_NAMES = {"pickle.load", "pickle.loads", "pickle.Unpickler", "pickle._load",
                "pickle._loads", "pickle._Unpickler", "os.system", "os.popen", "yaml.load",
                "yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.load_all",
                "torch.serialization.add_safe_globals", "torch.serialization.safe_globals",
                "dill.load", "dill.loads", "marshal.load", "marshal.loads", "builtins.eval",
                "builtins.exec"}
BANNED_BUILTINS = {"eval", "exec"}
BANNED_IMPORTS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"),
                  ("os", "system"), ("os", "popen"), ("yaml", "load"), ("yaml", "unsafe_load")}


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _findings(path: Path, root: Path = REPO) -> list[str]:
    rel = path.relative_to(root).as_posix()
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
    lines = path.read_text(encoding="utf-8").splitlines()
    found = []

    def flag(node: ast.AST, what: str) -> None:
        line = lines[node.lineno - 1].strip()
        if (rel, line.rstrip(":")) not in ALLOWED:
            found.append(f"{rel}:{node.lineno}: {what}: {line}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _dotted(node) in BANNED_NAMES:
            flag(node, _dotted(node))
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (node.module, alias.name) in BANNED_IMPORTS:
                    flag(node, f"from {node.module} import {alias.name}")
        elif isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name) and node.func.id in BANNED_BUILTINS:
                flag(node, node.func.id)
            shell = _keyword(node, "shell")
            if shell is not None and not (isinstance(shell, ast.Constant) and shell.value is False):
                flag(node, "shell=")
            weights_only = _keyword(node, "weights_only")
            if weights_only is not None and not (isinstance(weights_only, ast.Constant)
                                                 and weights_only.value is True):
                flag(node, "weights_only other than True")
            if _dotted(node.func) == "torch.load" and weights_only is None:
                flag(node, "torch.load without weights_only=True")
    return sorted(found, key=lambda f: int(f.split(":")[1]))


def test_source_loads_nothing_unsafely_and_uses_no_shell():
    findings = [f for path in _sources() for f in _findings(path)]
    assert not findings, "\n".join(findings)


def test_the_checker_catches_what_it_looks_for(tmp_path):
    bad = tmp_path / "trainer" / "bad.py"
    bad.parent.mkdir()
    bad.write_text("import os, pickle, torch, yaml, subprocess\n"
                   "from pickle import loads\n"
                   "pickle.load(open('x', 'rb'))\n"
                   "torch.load('x')\n"
                   "torch.load('x', weights_only=False)\n"
                   "eval('1')\n"
                   "subprocess.run('ls', shell=True)\n"
                   "os.system('ls')\n"
                   "yaml.load('a: 1')\n"
                   "model.eval()  # fine: a method\n"
                   "torch.load('x', map_location='cpu', weights_only=True)  # fine\n")
    found = _findings(bad, root=tmp_path)
    assert [int(f.split(":")[1]) for f in found] == [2, 3, 4, 5, 6, 7, 8, 9]


def test_cifar_unpickler_allow_list_is_pinned():
    """Only numpy array reconstruction (both numpy 1 and 2 module paths) and the latin-1
    bytes shim of Python-2 pickles; anything added here must be argued safe."""
    cores = ("numpy.core", "numpy._core")
    expected = {(f"{c}.multiarray", "_reconstruct") for c in cores} \
        | {(f"{c}.multiarray", "scalar") for c in cores} \
        | {(f"{c}.numeric", "_frombuffer") for c in cores} \
        | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}
    assert data._NUMPY_GLOBALS == expected


class _Reduce:
    """Pickles as ``func(*args)``: what an attacker's file would run on load."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


@pytest.mark.parametrize("payload", ["os.mkdir", "builtins.open", "builtins.eval",
                                     "numpy.load", "numpy.ctypeslib.load_library",
                                     "subprocess.Popen", "pickle.loads"])
def test_cifar_unpickler_refuses_every_other_global(tmp_path, payload):
    import builtins
    import subprocess

    marker = tmp_path / "pwned"
    funcs = {"os.mkdir": (os.mkdir, str(marker)),
             "builtins.open": (builtins.open, str(marker), "w"),
             "builtins.eval": (builtins.eval, f"open({str(marker)!r}, 'w')"),
             "numpy.load": (np.load, str(marker)),
             "numpy.ctypeslib.load_library": (np.ctypeslib.load_library, "libc", "/"),
             "subprocess.Popen": (subprocess.Popen, ["touch", str(marker)]),
             "pickle.loads": (pickle.loads, b"x")}
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": _Reduce(*funcs[payload]), "labels": []}, protocol=2))
    with pytest.raises(DataError, match="holds objects other than arrays"):
        data._safe_unpickle(path)
    assert not marker.exists()


def test_cifar_unpickler_reads_real_format_files(tmp_path):
    """The restricted loader still reads what torchvision's CIFAR files hold (protocol 2,
    numpy arrays, latin-1 strings) and what numpy 2 would write (protocol 5)."""
    folder = write_fake_cifar10(tmp_path)
    batch = data._safe_unpickle(folder / "data_batch_1")
    assert batch["data"].dtype == np.uint8 and batch["data"].shape == (20, 3072)
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    (tmp_path / "p5").write_bytes(pickle.dumps({"a": arr, "s": np.int64(3)}, protocol=5))
    back = data._safe_unpickle(tmp_path / "p5")
    assert np.array_equal(back["a"], arr) and back["s"] == 3
    assert build_datasets("cifar10", str(tmp_path), download=False).num_classes == 10

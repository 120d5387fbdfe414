"""Every command once as a user runs it: ``python -m launch <command>`` in a new interpreter.

The other CLI tests run the app in the test process (``tests.helpers.run_cli``); these runs
are what stays real for each command: the ``-m`` entry point, interpreter start-up and exit,
the exit code the shell sees. Each run is as small as the command allows; the inputs are
made in this process. A command added to the app needs a row in ``RUNS`` (checked below).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import typer.main

from launch.cli import make_app
from tests.helpers import make_small_checkpoint, run_cli
from trainer.files.checkpoint import load_checkpoint

PNG = b"\x89PNG\r\n\x1a\n"
SYNTHETIC = ["--dataset", "synthetic", "--synthetic-train", "32", "--synthetic-test", "16",
             "--batch-size", "16", "--num-workers", "0", "--cpu"]
TINY = ["--arch", "resnet18", "--image-size", "16"]  # the smallest model a run can train here
STUDY = [*SYNTHETIC, *TINY, "--train-epochs", "1", "--finetune-epochs", "1",
         "--finetune-batch-size", "16", "--limit-batches", "1", "--workdir", "w"]


def _trained(folder: Path, out) -> None:
    ckpt = load_checkpoint(folder / "t.pth")
    assert ckpt["arch"] == "resnet18" and ckpt["config"]["sparsity"] == 1e-4
    assert (folder / "t.png").read_bytes()[:8] == PNG


def _pruned(folder: Path, out) -> None:
    assert load_checkpoint(folder / "p.pth")["prune"]["ratio"] == 0.5


def _finetuned(folder: Path, out) -> None:
    ckpt = load_checkpoint(folder / "f.pth")
    assert ckpt["history"]["epoch"] == [1] and (folder / "f_metrics.csv").is_file()


def _evaluated(folder: Path, out) -> None:
    assert 0 <= json.loads(out.stdout.splitlines()[-1])["accuracy"] <= 100


def _study(name: str) -> Callable[[Path, object], None]:
    def check(folder: Path, out) -> None:
        ckpts = folder / "w" / "checkpoints"
        assert (ckpts / f"model_prune_{name}_finetune.pth").is_file()
        assert "model_prune" in (folder / "w" / "report.md").read_text()
    return check


def _swept(folder: Path, out) -> None:
    report = (folder / "s" / "sweep.md").read_text()
    assert "sparsity1e-05" in report and "sparsity0.0001" in report
    assert (folder / "s" / "plots" / "sweep.png").read_bytes()[:8] == PNG


def _described(folder: Path, out) -> None:
    assert "params" in out.stdout and "resnet50" in out.stdout


def _profiled(folder: Path, out) -> None:
    assert json.loads(out.stdout.splitlines()[-1])["macs"] > 0


def _compared(folder: Path, out) -> None:
    assert len(json.loads(out.stdout)["rows"]) == 2 and (folder / "c.png").is_file()


def _benched(folder: Path, out) -> None:
    assert json.loads(out.stdout.splitlines()[-1])["model_limit_img_s"] > 0


def _exported(folder: Path, out) -> None:
    assert (folder / "start.safetensors").is_file()


def _configured(folder: Path, out) -> None:
    assert "num_processes: 2" in (folder / "a.yaml").read_text()


# command -> (arguments, what the run must have done besides exiting 0)
RUNS: dict[str, tuple[list[str], Callable[[Path, object], None]]] = {
    "train": (["train", *TINY, *SYNTHETIC, "--epochs", "1", "--sparsity", "1e-4",
               "--output", "t.pth", "--plot", "t.png"], _trained),
    "prune": (["prune", "--checkpoint", "start.pth", "--ratio", "0.5", "--no-eval", "--cpu",
               "--output", "p.pth"], _pruned),
    "finetune": (["finetune", "--checkpoint", "start.pth", *SYNTHETIC, "--epochs", "1",
                  "--limit-batches", "1", "--output", "f.pth", "--plot", "f.png"], _finetuned),
    "evaluate": (["evaluate", "start.pth", *SYNTHETIC, "--json"], _evaluated),
    "pipeline": (["pipeline", *STUDY, "--ratios", "0.5"], _study("50")),
    "demo": (["demo", *TINY, "--synthetic-train", "32", "--synthetic-test", "16",
              "--train-epochs", "1", "--finetune-epochs", "1", "--limit-batches", "1",
              "--ratios", "0.5", "--workdir", "w"], _study("50")),
    "sweep": (["sweep", *STUDY[:-1], "s", "--ratios", "0.5", "--sparsity", "1e-5,1e-4"],
              _swept),
    "info": (["info", "start.pth"], _described),
    "profile": (["profile", "start.pth", "--json"], _profiled),
    "compare": (["compare", "start.pth", "other.pth", "--output", "c.png", "--json"], _compared),
    "bench": (["bench", "--cpu", "--steps", "1", "--repeats", "1", "--batch-size", "4",
               "--num-workers", "0", "--loaders", "torch", "--no-inference", "--json"],
              _benched),
    "export": (["export", "start.pth", "--format", "safetensors"], _exported),
    "config": (["config", "--gpus", "2", "--cpu", "--output", "a.yaml"], _configured),
}


def test_every_command_has_an_end_to_end_run():
    assert set(RUNS) == set(typer.main.get_command(make_app()).commands)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    make_small_checkpoint(folder / "start.pth")
    make_small_checkpoint(folder / "other.pth", width=8, seed=1)
    return folder


@pytest.mark.slow  # a new interpreter imports torch: ~3-5 s before the command starts
@pytest.mark.parametrize("command", RUNS)
def test_command_end_to_end(command: str, inputs: Path, tmp_path: Path):
    for name in ("start.pth", "other.pth"):
        (tmp_path / name).symlink_to(inputs / name)
    args, check = RUNS[command]
    out = run_cli(*args, cwd=tmp_path, timeout=300, process=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    check(tmp_path, out)

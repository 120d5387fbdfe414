"""Kill-and-resume: a fine-tune SIGKILLed mid-epoch and mid-checkpoint-write, then rerun with
``--resume`` until it finishes, ends with the same best checkpoint (tensors, history, best
accuracy and epoch, config) and metrics CSV as an uninterrupted run, bit for bit; the best
checkpoint on disk loads at every kill point. Single process and 2-process gloo DDP.

Why no RNG states in the resume state: a run resumes at an epoch boundary, and everything
random in an epoch is a pure function of (seed, epoch, rank): the sampler order and the
augmentation (trainer.data.datasets), and the global torch RNG, reseeded per epoch
(trainer.train.fit).
"""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

import pytest

from tests._faults import assert_same_run, env, finetune_args, make_shared, start
from tests.helpers import make_small_checkpoint, run_cli, small_cfg
from trainer.config.settings import FINETUNE_RECIPE as FINETUNE_DEFAULTS
from trainer.config.settings import RunConfig
from trainer.errors import ConfigError
from trainer.files.checkpoint import atomic_torch_save, load_checkpoint, safe_torch_load
from trainer.models.resnet import ResNet50
from trainer.train.fit import empty_history, load_resume
from trainer.train.loop import make_optimizer

DDP = ["--gpus", "2"]
# Seed of the single-process runs: their test accuracy improves at epochs 2 and 3, so epoch 2
# rewrites the best checkpoint (a kill point). The last --seed on the command line wins.
SINGLE = ["--seed", "2"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    make_shared(root)
    return root


def _run(root: Path, name: str, *extra: str, faults: dict[str, str] | None = None,
         timeout: float = 240) -> subprocess.CompletedProcess:
    folder = root / name
    folder.mkdir(exist_ok=True)
    return run_cli(*finetune_args(*extra), cwd=folder, env=env(**(faults or {})),
                   timeout=timeout)


def _state(root: Path, name: str) -> tuple[int | None, int | None]:
    """(epochs in the resume state, best_epoch of the best checkpoint), None where absent;
    loading the best checkpoint proves it is intact."""
    out = root / name / "out"
    last = safe_torch_load(out / "x.last.pth")["epoch"] if (out / "x.last.pth").exists() else None
    best = load_checkpoint(out / "x.pth")["best_epoch"] if (out / "x.pth").exists() else None
    return last, best


def _kill_chain(root: Path, name: str, kills: list[tuple[dict, tuple]],
                *extra: str) -> list[subprocess.CompletedProcess]:
    """Run, SIGKILLed by each fault in turn, resuming after each; then resume to the end.

    After each kill: the expected (resume-state epochs, best_epoch), the best checkpoint loads.
    """
    results = []
    for i, (faults, expected) in enumerate(kills):
        results.append(_run(root, name, *extra, *(["--resume"] if i else []), faults=faults))
        assert results[-1].returncode != 0, results[-1].stderr[-2000:]
        assert _state(root, name) == expected, faults
    final = _run(root, name, *extra, "--resume")
    assert final.returncode == 0, final.stdout[-2000:] + final.stderr[-3000:]
    assert "resuming x.pth at epoch" in final.stdout
    assert not list((root / name / "out").glob(".*.tmp")), "stale temp files left behind"
    return results


# Single process: (faults, (resume-state epochs, best_epoch) right after the kill).
SINGLE_KILLS = [
    ({"SLIMTUNE_TEST_KILL_IN_SAVE": "x.pth:2"}, (1, 1)),  # epoch 2's best write, half done
    ({"SLIMTUNE_TEST_KILL_IN_SAVE": "x.last.pth:1"}, (1, 2)),  # epoch 2's resume-state write
    ({"SLIMTUNE_TEST_KILL_AT": "3:3"}, (2, 2)),  # mid-epoch 3
]


def _watched_run(root: Path, name: str, *extra: str) -> int:
    """Run to the end while reading the best checkpoint over and over (each read must load);
    returns the number of reads."""
    folder = root / name
    folder.mkdir()
    proc = start(finetune_args(*extra), folder, env(), log=folder / "log.txt")
    best, loads = folder / "out" / "x.pth", 0
    try:
        while proc.poll() is None:
            if best.exists():  # written by os.replace: never missing once it exists
                load_checkpoint(best)
                loads += 1
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == 0, (folder / "log.txt").read_text()[-3000:]
    return loads


@pytest.mark.slow  # ~60 s on a busy 2-core machine
def test_killed_single_process_run_resumes_to_the_identical_result(root):
    assert _watched_run(root, "ref", *SINGLE) >= 3  # the best checkpoint loaded at every read
    assert _state(root, "ref")[1] >= 2  # epoch 2 rewrites the best checkpoint (a kill point)
    _kill_chain(root, "single", SINGLE_KILLS, *SINGLE)
    assert_same_run(root / "ref", root / "single")


def _digest(folder: Path) -> dict[str, str]:
    """Every file's hash, but the output lock: a killed run leaves its lock file, and the next
    run takes it over and removes it (docs/reliability.md, "the lock")."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix != ".lock"}


@pytest.mark.slow  # CLI runs, 5-8 s on 2 busy cores
def test_resume_refuses_changed_settings_in_one_line(root):
    if not (root / "ref" / "out" / "x.last.pth").exists():
        pytest.skip("needs the uninterrupted run of the single-process test")
    before = _digest(root / "ref")
    result = _run(root, "ref", *SINGLE, "--resume", "--batch-size", "10", "--lr", "0.01",
                  "--epochs", "4", "--loader", "gpu")
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --resume refused"), result.stderr
    for part in ("batch_size: 20 -> 10", "epochs: 3 -> 4", "lr: 0.003 -> 0.01",
                 "loader: 'torch' -> 'gpu'", "--force-resume"):
        assert part in lines[0]
    assert _digest(root / "ref") == before


@pytest.mark.slow  # CLI runs, 5-8 s on 2 busy cores
def test_force_resume_continues_with_changed_epochs(root):
    if not (root / "single" / "out" / "x.last.pth").exists():
        pytest.skip("needs the resumed run of the single-process test")
    result = _run(root, "single", *SINGLE, "--resume", "--force-resume", "--epochs", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = safe_torch_load(root / "single" / "out" / "x.last.pth")
    assert ckpt["epoch"] == 4 and ckpt["history"]["epoch"] == [1, 2, 3, 4]


@pytest.mark.slow  # CLI runs, 5-8 s on 2 busy cores
def test_resume_without_a_resume_state_is_refused(root, tmp_path):
    (root / "fresh").mkdir()
    result = _run(root, "fresh", "--resume")
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no resume state" in lines[0] and "without --resume" in lines[0]
    assert not (root / "fresh" / "out" / "x.pth").exists()


@pytest.mark.slow  # ~15 s
def test_a_fresh_start_does_not_discard_an_interrupted_run(root):
    """A forgotten --resume would have wiped the resume state (and the CSV) at once."""
    killed = _run(root, "forgot", *SINGLE, faults={"SLIMTUNE_TEST_KILL_AT": "2:1"})
    assert killed.returncode != 0 and _state(root, "forgot") == (1, 1)
    before = _digest(root / "forgot")
    again = _run(root, "forgot", *SINGLE)
    assert again.returncode == 2, again.stderr[-2000:]
    lines = [ln for ln in again.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "x.last.pth holds an interrupted run (1 of 3 epochs done)" in \
        lines[0] and "add --resume" in lines[0], again.stderr
    assert _digest(root / "forgot") == before


# 2-process gloo DDP through the launcher.
DDP_KILLS = [
    ({"SLIMTUNE_TEST_KILL_AT": "2:3:1"}, (1, 1)),  # rank 1 SIGKILLed mid-epoch 2
    ({"SLIMTUNE_TEST_KILL_IN_SAVE": "x.last.pth:1"}, (1, 1)),  # rank 0 in epoch 2's state write
]


@pytest.mark.slow  # ~80 s on a busy 2-core machine
def test_killed_ddp_run_resumes_to_the_identical_result(root):
    ref = _run(root, "ddp_ref", *DDP)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert _state(root, "ddp_ref")[0] == 3
    results = _kill_chain(root, "ddp", DDP_KILLS, *DDP)
    assert_same_run(root / "ddp_ref", root / "ddp")
    # A rank killed without a word is named last, not the peer that lost it.
    for result, rank in zip(results, (1, 0)):
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: rank {rank} died without reporting an error"), last


# ---------------------------------------------------------------- what --force-resume cannot bridge


def _resume_state(path: Path, width: int, optimizer: str) -> Path:
    """A resume state as fit() writes it: weights of a small pruned model after 1 epoch."""
    model = ResNet50(10, small_cfg(width))
    opt = make_optimizer(model, _cfg(optimizer=optimizer))
    atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 1,
                       "best_acc": 10.0, "best_epoch": 1, "history": empty_history(),
                       "config": {"optimizer": optimizer, "data_dir": "data"}}, path)
    return path


def _cfg(**over):
    return RunConfig(**{**FINETUNE_DEFAULTS, "command": "finetune", "cpu": True,
                        "data_dir": "data", **over})


def _load(path: Path, width: int, **over):
    cfg = _cfg(**over)
    model = ResNet50(10, small_cfg(width))
    return load_resume(path, cfg, model, make_optimizer(model, cfg))


def test_force_resume_refuses_in_one_line_what_it_cannot_bridge(tmp_path):
    state = _resume_state(tmp_path / "x.last.pth", 4, "adam")
    assert _load(state, 4, force_resume=True).next_epoch == 1
    assert _load(state, 4, data_dir="./data/").next_epoch == 1  # one folder, spelt two ways
    with pytest.raises(ConfigError, match=r"do not fit this model \(Error\(s\) in loading"):
        _load(state, 8, force_resume=True)  # another --checkpoint: other widths
    with pytest.raises(ConfigError, match=r"written with --optimizer adam; .* even with "
                                          r"--force-resume; use --optimizer adam"):
        _load(state, 4, optimizer="sgd", force_resume=True)
    make_small_checkpoint(tmp_path / "best.pth")  # a best checkpoint, not a resume state
    with pytest.raises(ConfigError, match=r"best\.pth is not a resume state \(no model, "
                                          r"optimizer, epoch"):
        _load(tmp_path / "best.pth", 4)

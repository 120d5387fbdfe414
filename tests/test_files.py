"""Atomic writes (trainer.files.atomic): whole files with the user's usual mode, or nothing."""

from __future__ import annotations

import os

import pytest

from launch.accelerate_config import write_config
from trainer.files.atomic import atomic_path, atomic_write_text
from trainer.files.checkpoint import atomic_torch_save
from trainer.measure.plots import plot_curves


def test_every_kind_of_output_gets_the_usual_file_mode(tmp_path):
    """Written through mkstemp (0600), but shared like any file the user creates (umask):
    checkpoints, figures, report text and launch configs alike."""
    history = {"epoch": [1, 2], "lr": [0.1, 0.1], "train_loss": [2.0, 1.5],
               "train_acc": [20.0, 40.0], "test_loss": [2.1, 1.6], "test_acc": [18.0, 35.0]}
    old = os.umask(0o027)
    try:
        atomic_torch_save({"x": 1}, tmp_path / "a.pth")
        plot_curves(history, tmp_path / "a.png", title="t", best_epoch=2)
        atomic_write_text(tmp_path / "report.md", "# r\n")
        write_config({"num_processes": 2}, tmp_path / "a.yaml")
    finally:
        os.umask(old)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["a.png", "a.pth", "a.yaml", "report.md"]  # no temp file left
    for name in names:
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "report.md"
    target.write_text("old\n")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("disk full")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]

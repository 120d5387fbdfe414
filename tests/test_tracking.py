"""``--log-with tensorboard`` end to end: the real CLI fine-tunes with TensorBoard installed,
and the event file, read back with TensorBoard's own reader, holds every epoch's train/test
loss, accuracy and learning rate, equal to the metrics CSV."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.fakedata import write_fake_cifar10
from tests.helpers import FAST, make_small_checkpoint, run_cli

TAGS = ("train_loss", "train_acc", "test_loss", "test_acc", "lr")
EPOCHS = 2


def _scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from every event file under ``run_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for events in sorted(run_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


@pytest.mark.slow  # ~12 s: a 2-epoch fine-tune in a subprocess
def test_tensorboard_logs_every_epoch(tmp_path):
    pytest.importorskip("tensorboard")
    make_small_checkpoint(tmp_path / "start.pth")
    write_fake_cifar10(tmp_path / "data")
    r = run_cli("finetune", "--checkpoint", "start.pth", "--dataset", "cifar10", "--data-dir",
                "data", "--no-download", "--epochs", str(EPOCHS), "--output", "out/x.pth",
                "--log-with", "tensorboard", *FAST, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = tmp_path / "runs" / "x"  # <workdir>/runs/<output stem>
    assert list(run_dir.glob("events.out.tfevents.*")), sorted(tmp_path.rglob("*"))
    logged = _scalars(run_dir)
    with open(tmp_path / "out" / "x_metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(row["epoch"]) for row in rows] == list(range(1, EPOCHS + 1))
    for tag in TAGS:
        assert sorted(logged.get(tag, {})) == list(range(1, EPOCHS + 1)), (tag, logged.keys())
        for row in rows:
            want = float(row[tag])
            assert logged[tag][int(row["epoch"])] == pytest.approx(want, rel=1e-6, abs=1e-9), tag

"""Measured latency beside MACs: interleaved rounds, median and min–max, images/s, ONNX
Runtime, the speed-up panel of ``compare`` and report.md's columns (trainer.measure.profiling,
trainer.measure.report, trainer.cli.measure)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib.image as mpimg
import pytest
import torch
import typer
from typer.testing import CliRunner

from tests.helpers import make_small_checkpoint, run_cli
from trainer.cli.measure import register
from trainer.errors import UserError
from trainer.files.checkpoint import make_checkpoint, save_checkpoint
from trainer.measure import profiling
from trainer.measure.bench import random_gamma_model
from trainer.measure.profiling import measure_latencies, measure_latency, resolve_device
from trainer.measure.report import add_latency, compare_rows, write_report
from trainer.prune.engine import prune

APP = typer.Typer()
register(APP)
MEDIAN_MIN_MAX = re.compile(r"\d+\.\d\d \(\d+\.\d\d–\d+\.\d\d\)")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_vgg(ratio: float | None = None) -> torch.nn.Module:
    model = random_gamma_model(10, 0, "vgg11")
    return prune(model, ratio).model if ratio else model


@pytest.fixture(scope="module")
def vgg_ckpts(tmp_path_factory) -> tuple[Path, Path]:
    """A VGG-11 pruned at 0.8 and at 0.95 (fast on the CPU)."""
    folder = tmp_path_factory.mktemp("latency")
    full, small = folder / "full.pth", folder / "small.pth"
    save_checkpoint(full, make_checkpoint(tiny_vgg(0.8), best_acc=50.0))
    save_checkpoint(small, make_checkpoint(tiny_vgg(0.95), best_acc=40.0))
    return full, small


def invoke_ok(*args: object):
    result = CliRunner().invoke(APP, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result


# ---------------------------------------------------------------- measure_latencies


def test_rounds_interleave_the_models(monkeypatch):
    """Warm-up of every (model, batch) first; then each round times every model once per
    batch size, so round k of every model is measured before round k+1 of any."""
    calls = []
    fake_ms = iter(range(1, 1000))

    def timed(run, x, device):
        calls.append((run.tag, len(x)))
        return float(next(fake_ms))

    models = {"a": tiny_vgg(0.95), "b": tiny_vgg(0.9)}
    for name, model in models.items():
        model.tag = name
    monkeypatch.setattr(profiling, "_torch_runner", lambda m, device: m)
    monkeypatch.setattr(profiling, "_timed_ms", timed)
    out = measure_latencies(models, "cpu", 32, batches=(1, 2), warmup=2, repeats=3)
    warm, rounds = calls[:8], calls[8:]
    assert warm == [("a", 1), ("a", 1), ("a", 2), ("a", 2), ("b", 1), ("b", 1), ("b", 2), ("b", 2)]
    assert rounds == [("a", 1), ("a", 2), ("b", 1), ("b", 2)] * 3
    # times 9..20 in call order: a/1 got 9, 13, 17 -> median 13, min 9, max 17
    a1 = out["a"]["batches"][0]
    assert (a1["ms_per_batch"], a1["ms_min"], a1["ms_max"]) == (13.0, 9.0, 17.0)
    b2 = out["b"]["batches"][1]
    assert (b2["batch"], b2["ms_per_batch"]) == (2, 16.0)
    assert b2["images_per_s"] == pytest.approx(2 / 0.016) and b2["ms_per_image"] == 8.0
    assert out["a"]["runtime"] == "torch" and out["a"]["repeats"] == 3
    assert out["a"]["warmup"] == 2 and out["a"]["threads"] == 1


def test_measure_latency_keeps_its_keys_and_adds_min_max():
    out = measure_latency(tiny_vgg(0.95), "cpu", input_size=32, batches=(1, 2), warmup=1,
                          repeats=3)
    assert [b["batch"] for b in out["batches"]] == [1, 2]
    for b in out["batches"]:
        assert 0 < b["ms_min"] <= b["ms_per_batch"] <= b["ms_max"]
        assert b["ms_per_image"] == pytest.approx(b["ms_per_batch"] / b["batch"])
        assert b["images_per_s"] == pytest.approx(1000 * b["batch"] / b["ms_per_batch"])


def test_onnxruntime_latency():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    out = measure_latency(tiny_vgg(0.95), "cpu", input_size=32, batches=(1, 3), warmup=1,
                          repeats=2, runtime="onnxruntime")
    assert out["runtime"] == "onnxruntime" and out["device"] == "cpu"
    assert all(b["ms_per_batch"] > 0 for b in out["batches"])


def test_device_and_runtime_choices():
    assert resolve_device(None, cpu=True) == "cpu" and resolve_device("cpu") == "cpu"
    assert resolve_device(None, runtime="onnxruntime") == "cpu"
    with pytest.raises(UserError, match="--cpu and --device cuda contradict"):
        resolve_device("cuda", cpu=True)
    with pytest.raises(UserError, match="--device 'tpu': use cpu or cuda"):
        resolve_device("tpu")
    with pytest.raises(UserError, match="--runtime 'tensorrt': use torch or onnxruntime"):
        measure_latency(tiny_vgg(0.95), "cpu", runtime="tensorrt")
    with pytest.raises(UserError, match="CPU provider; use --device cpu"):
        measure_latency(tiny_vgg(0.95), "cuda", runtime="onnxruntime")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda but no CUDA GPU is visible"):
            resolve_device("cuda")


# ---------------------------------------------------------------- profile / compare / report


def test_profile_latency_table_and_json(vgg_ckpts):
    full, small = vgg_ckpts
    args = ["--latency", "--device", "cpu", "--batch-sizes", "1,2", "--repeats", 2,
            "--warmup", 1, full, small]
    table = invoke_ok("profile", *args).stdout
    assert "Measured latency" in table and "images/s" in table and "b=2 ms/batch" in table
    assert len(MEDIAN_MIN_MAX.findall(table)) == 4  # 2 models x 2 batch sizes
    lines = invoke_ok("profile", "--json", *args).stdout.strip().splitlines()
    lat = [json.loads(line)["latency"] for line in lines]
    assert [b["batch"] for b in lat[1]["batches"]] == [1, 2]
    assert lat[0]["runtime"] == "torch" and "ms_min" in lat[0]["batches"][0]


def test_compare_latency_adds_speedups_and_the_fourth_panel(vgg_ckpts, tmp_path):
    full, small = vgg_ckpts
    fig = tmp_path / "cmp.png"
    data = json.loads(invoke_ok("compare", "--json", full, small, "--output", fig, "--latency",
                                "--device", "cpu", "--batch-sizes", "1,2", "--repeats", 2,
                                "--warmup", 1).stdout)
    base, other = data["rows"]
    assert base["mac_speedup"] == 1.0
    assert other["mac_speedup"] == pytest.approx(base["macs"] / other["macs"])
    for b, mine in zip(base["latency"]["batches"], other["latency"]["batches"]):
        assert b["speedup"] == 1.0
        assert mine["speedup"] == pytest.approx(b["ms_per_batch"] / mine["ms_per_batch"])
    assert mpimg.imread(fig).shape[:2] == (750, 2400)  # 16 x 5 in: four panels
    plain = tmp_path / "plain.png"
    invoke_ok("compare", "--json", full, small, "--output", plain)
    assert mpimg.imread(plain).shape[:2] == (750, 1800)  # without --latency: three panels


def test_report_md_gets_the_latency_columns(vgg_ckpts, tmp_path):
    full, small = vgg_ckpts
    rows = compare_rows([str(full), str(small)], ["full", "pruned"])
    add_latency(rows, device="cpu", batches=(1,), warmup=0, repeats=1)
    text = write_report(tmp_path, title="t", rows=rows, figures=[]).read_text()
    assert "## Measured latency" in text
    assert "| label | MACs speed-up (theory) | b=1 ms/batch median (min–max) |" in text
    assert re.search(r"\| pruned \| \d+\.\d\d× \| " + MEDIAN_MIN_MAX.pattern, text)


# ---------------------------------------------------------------- the lab model, real CLI


@pytest.mark.slow
def test_profile_latency_pruned_vs_unpruned_lab_model(tmp_path):
    """The acceptance run: medians with min–max for the unpruned and a pruned ResNet-50."""
    save_checkpoint(tmp_path / "full.pth", make_checkpoint(random_gamma_model(10, 0)))
    make_small_checkpoint(tmp_path / "pruned.pth", width=16)
    r = run_cli("profile", "--latency", "--device", "cpu", "--batch-sizes", "1,4", "--repeats",
                "3", "--warmup", "1", "full.pth", "pruned.pth", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(MEDIAN_MIN_MAX.findall(r.stdout)) == 4, r.stdout
    assert "interleaved rounds" in r.stdout


def test_the_pipelines_quick_latency_never_fails_the_study(vgg_ckpts, monkeypatch, capsys):
    from trainer.measure import report

    full, small = vgg_ckpts
    rows = compare_rows([str(full), str(small)])
    assert report.quick_latency(rows, cpu=True)[1]["latency"]["repeats"] == 5

    def boom(*args, **kwargs):
        rows[0]["latency"] = {"half": "done"}
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(report, "add_latency", boom)
    rows = compare_rows([str(full), str(small)])
    assert all("latency" not in r for r in report.quick_latency(rows))
    assert "latency not measured (RuntimeError: CUDA out of memory)" in capsys.readouterr().out

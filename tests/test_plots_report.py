"""Figures (trainer.measure.plots), the profile/compare commands and report.md
(trainer.measure.report)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from trainer.cli.measure import register
from trainer.errors import CheckpointError, UserError
from trainer.files.checkpoint import make_checkpoint, save_checkpoint
from trainer.measure.plots import plot_comparison, plot_curves, plot_gamma_hist
from trainer.measure.profiling import profile_model
from trainer.measure.report import StudyRow, compare_rows, render_compare_table, write_report
from trainer.models.family import count_params
from trainer.models.resnet import ResNet50, default_widths, prunable_indices

APP = typer.Typer()
register(APP)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These models are tiny: one thread is as fast when idle and ~5x faster on a loaded
    2-core machine, where two spinning OpenMP threads fight the other jobs for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

HISTORY = {"epoch": [1, 2, 3, 4], "lr": [0.1, 0.1, 0.01, 0.01],
           "train_loss": [2.0, 1.5, 1.2, 1.1], "train_acc": [30.0, 45.0, 50.0, 52.0],
           "test_loss": [2.1, 1.7, 1.4, 1.45], "test_acc": [28.0, 41.5, 47.25, 46.0]}


def scaled_cfg(divisor: int) -> list[int]:
    cfg = default_widths()
    for i in prunable_indices():
        cfg[i] = max(1, cfg[i] // divisor)
    return cfg


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, tuple[Path, ResNet50]]:
    """Two small pruned checkpoints: 'big' (with history) and 'small' (best_acc only)."""
    folder = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    out = {}
    for name, divisor, extra in (("big", 8, {"history": HISTORY}),
                                 ("small", 32, {"best_acc": 40.5})):
        model = ResNet50(widths=scaled_cfg(divisor))
        path = folder / f"{name}.pth"
        save_checkpoint(path, make_checkpoint(model, **extra))
        out[name] = (path, model)
    return out


def invoke(*args: object):
    return CliRunner().invoke(APP, [str(a) for a in args])


def invoke_ok(*args: object):
    result = invoke(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def invoke_error(*args: object, error: type[Exception] = UserError, match: str = ""):
    """What the lead's wrapper turns into 'error: <msg>' and exit 2: a UserError, no output."""
    result = invoke(*args)
    assert result.exit_code != 0
    assert isinstance(result.exception, error), result.exception
    assert match in str(result.exception)
    assert "\n" not in str(result.exception)  # one-line message
    return result


def png_shape(path: Path) -> tuple[int, ...]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return mpimg.imread(path).shape


# ---------------------------------------------------------------- profile / compare CLI


def test_profile_json_lines(ckpts):
    (big, big_model), (small, small_model) = ckpts["big"], ckpts["small"]
    result = invoke_ok("profile", "--json", big, small)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2
    got = [json.loads(line) for line in lines]
    for info, model, name in ((got[0], big_model, "big"), (got[1], small_model, "small")):
        expected = profile_model(model)
        assert info["name"] == name and info["input_size"] == 32
        assert info["params"] == count_params(model) == expected["params"]
        assert info["macs"] == expected["macs"] and info["flops"] == 2 * info["macs"]
    assert got[0]["best_acc"] == 47.25 and got[1]["best_acc"] == 40.5


def test_profile_json_input_size(ckpts):
    path, model = ckpts["small"]
    info = json.loads(invoke_ok("profile", "--json", "--input-size", 64, path).stdout)
    assert info["input_size"] == 64 and info["macs"] == profile_model(model, 64)["macs"]


def test_profile_table(ckpts):
    path, model = ckpts["big"]
    out = invoke_ok("profile", path).stdout
    assert "MACs (M)" in out and "FLOPs (M) = 2×MACs" in out
    assert f"{count_params(model):,}" in out
    assert f"{profile_model(model)['macs'] / 1e6:.2f}" in out and "47.25" in out


def test_profile_latency_json(ckpts):
    path, _ = ckpts["small"]
    # tiny settings: the first forward of each new shape pays for oneDNN kernel set-up
    info = json.loads(invoke_ok("profile", "--json", "--latency", "--cpu", "--batch-sizes",
                                "1,2", "--repeats", 1, "--input-size", 8, path).stdout)
    lat = info["latency"]
    assert lat["device"] == "cpu" and [b["batch"] for b in lat["batches"]] == [1, 2]
    assert all(b["ms_per_batch"] > 0 for b in lat["batches"])


def test_compare_json_and_figure(ckpts, tmp_path):
    (big, big_model), (small, small_model) = ckpts["big"], ckpts["small"]
    fig = tmp_path / "out" / "cmp.png"
    result = invoke_ok("compare", "--json", big, small, "--labels", "wide,narrow", "--output", fig)
    data = json.loads(result.stdout)  # the whole stdout is one JSON object
    assert data["figure"] == str(fig)
    base, other = data["rows"]
    assert (base["label"], base["baseline"], other["label"], other["baseline"]) == \
        ("wide", True, "narrow", False)
    assert base["params"] == count_params(big_model)
    assert other["params"] == count_params(small_model)
    assert other["macs"] == profile_model(small_model)["macs"]
    assert other["flops"] == 2 * other["macs"]
    assert other["param_reduction_pct"] == pytest.approx(
        100 * (1 - other["params"] / base["params"]))
    assert other["mac_reduction_pct"] == pytest.approx(100 * (1 - other["macs"] / base["macs"]))
    assert other["acc_delta"] == pytest.approx(40.5 - 47.25)
    assert base["param_reduction_pct"] == 0.0 and base["acc_delta"] == 0.0
    assert png_shape(fig) == (750, 1800, 4)  # 12 x 5 in at 150 dpi


def test_compare_baseline_option(ckpts, tmp_path):
    (big, _), (small, _) = ckpts["big"], ckpts["small"]
    fig = tmp_path / "c.png"
    # baseline among the checkpoints: moved first, keeps its label
    rows = json.loads(invoke_ok("compare", "--json", small, big, "--labels", "s,b",
                                "--baseline", big, "--output", fig).stdout)["rows"]
    assert [r["label"] for r in rows] == ["b", "s"] and rows[0]["baseline"]
    # baseline not among them: added first, named by its file
    rows = json.loads(invoke_ok("compare", "--json", small, "--baseline", big,
                                "--output", fig).stdout)["rows"]
    assert [r["label"] for r in rows] == ["big", "small"]
    assert rows[1]["param_reduction_pct"] > 0


def test_compare_table_output(ckpts, tmp_path):
    (big, _), (small, _) = ckpts["big"], ckpts["small"]
    fig = tmp_path / "table.png"
    out = invoke_ok("compare", big, small, "--output", fig).stdout
    rows = compare_rows([str(big), str(small)])
    assert f"figure: {fig}" in out.replace("\n", "")
    assert f"{rows[1]['param_reduction_pct']:.1f}%" in out
    assert f"{rows[1]['macs'] / 1e6:.2f}" in out and "-6.75" in out
    assert fig.exists()


def test_render_compare_table_columns(ckpts):
    table = render_compare_table(compare_rows([str(ckpts["big"][0]), str(ckpts["small"][0])]))
    headers = [c.header for c in table.columns]
    assert "MACs (M)" in headers and "FLOPs (M) = 2×MACs" in headers and table.row_count == 2


@pytest.mark.parametrize("command", ["profile", "compare"])
def test_bad_files_are_checkpoint_errors(command, tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    invoke_error(command, junk, "--output" if command == "compare" else "--json",
                 *([tmp_path / "x.png"] if command == "compare" else []), error=CheckpointError)
    vgg = tmp_path / "vgg.pth"
    torch.save({"arch": "vgg16", "cfg": [64] * 13, "state_dict": {}}, vgg)
    invoke_error(command, vgg, error=CheckpointError, match="vgg16")
    invoke_error(command, tmp_path / "missing.pth", error=CheckpointError, match="does not exist")


def test_bad_options_are_user_errors(ckpts, tmp_path):
    path = ckpts["small"][0]
    invoke_error("profile", "--input-size", 0, path, match="--input-size")
    invoke_error("compare", "--input-size", 0, path, match="--input-size")
    invoke_error("compare", path, path, "--labels", "only-one", match="--labels")
    invoke_error("compare", path, "--labels", "", match="--labels")
    invoke_error("profile", "--latency", "--batch-sizes", "1,x", path, match="--batch-sizes")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    invoke_error("compare", path, "--output", blocker / "c.png", match="--output")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_help_texts():
    group = typer.main.get_command(APP)
    for name, first_line in (("profile", "Count params, MACs"), ("compare", "Compare checkpoints")):
        cmd = group.commands[name]
        assert cmd.get_short_help_str(limit=200).startswith(first_line)
        options = [p for p in cmd.params if isinstance(p, typer.core.TyperOption)]
        assert len(options) >= 3
        for opt in options:
            assert opt.help and "default" in opt.help, opt.name

# ---------------------------------------------------------------- figures


def test_plot_curves_writes_png(tmp_path):
    path = plot_curves(HISTORY, tmp_path / "deep" / "curves.png", title="fine-tune", best_epoch=3)
    assert path == tmp_path / "deep" / "curves.png"
    assert png_shape(path) == (690, 1800, 4)
    assert [p.name for p in path.parent.iterdir()] == ["curves.png"]  # no temp file left


def test_plot_curves_single_epoch_and_smooth_lr(tmp_path):
    one = {k: v[:1] for k, v in HISTORY.items()}
    assert png_shape(plot_curves(one, tmp_path / "one.png", title="1 epoch"))[:2] == (690, 1800)
    n = 30
    cosine = {"epoch": list(range(1, n + 1)),
              "lr": [0.05 * (1 + math.cos(math.pi * e / n)) / 2 + 1e-5 for e in range(1, n + 1)],
              "train_acc": list(np.linspace(20, 90, n)), "test_acc": list(np.linspace(18, 85, n)),
              "train_loss": list(np.linspace(2, 0.2, n)), "test_loss": list(np.linspace(2, 0.4, n))}
    assert png_shape(plot_curves(cosine, tmp_path / "cos.png", title="cosine"))[:2] == (690, 1800)


def test_plot_curves_rejects_empty_history(tmp_path):
    with pytest.raises(ValueError):
        plot_curves({"epoch": []}, tmp_path / "x.png", title="empty")


def test_plot_gamma_hist(tmp_path):
    gammas = torch.cat([torch.rand(500) * 0.01, torch.rand(500) + 0.2])
    path = plot_gamma_hist(gammas, tmp_path / "g.png", threshold=0.01, title="γ",
                           label="threshold 0.01 (ratio 0.5)")
    assert png_shape(path) == (690, 1200, 4)
    path = plot_gamma_hist(gammas.numpy(), tmp_path / "g2.png", threshold=None, title="γ",
                           log_count=False)
    assert png_shape(path) == (690, 1200, 4)


def test_plot_comparison_with_missing_accuracy(tmp_path):
    rows = [{"label": "base", "best_acc": None, "params": 10, "macs": 20},
            {"label": "pruned", "best_acc": 90.0, "params": 5, "macs": 8, "baseline": True}]
    assert png_shape(plot_comparison(rows, tmp_path / "c.png"))[:2] == (750, 1800)


# ---------------------------------------------------------------- report.md


def test_write_report(ckpts, tmp_path):
    (big, _), (small, _) = ckpts["big"], ckpts["small"]
    rows = compare_rows([str(big), str(small)], ["baseline", "pruned"])
    fig = plot_comparison(rows, tmp_path / "plots" / "comparison.png")
    curves = plot_curves(HISTORY, tmp_path / "plots" / "curves.png", title="t")
    pipeline = [StudyRow("ratio 0.5", "50", 1, True, 0.5, str(small), str(small),
                         rows[1]["params"], 40.5, 10.0, rows[1]["macs"])]
    report = write_report(tmp_path, title="Slimming study", rows=rows,
                          figures=[("Comparison", fig), ("Training curves", curves)],
                          pipeline_rows=pipeline, settings={"epochs": 4, "sparsity": 1e-4})
    assert report == tmp_path / "report.md"
    text = report.read_text(encoding="utf-8")
    assert text.startswith("# Slimming study\n")
    assert "- **epochs**: 4" in text and "- **sparsity**: 0.0001" in text
    assert "![Comparison](plots/comparison.png)" in text
    assert "![Training curves](plots/curves.png)" in text
    for r in rows:
        assert f"{r['params']:,}" in text and f"{r['macs'] / 1e6:.2f}" in text
        assert f"{r['flops'] / 1e6:.2f}" in text
    assert f"{rows[1]['param_reduction_pct']:.1f}%" in text and "-6.75" in text
    assert "| 0.5 |" in text and "10.00" in text and "40.50" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plots", "report.md"]


def test_every_panel_title_fits_in_the_comparison_figure(tmp_path, monkeypatch):
    """The fourth panel's title ('measured speed-up vs MAC reduction') ran past the figure's
    right edge and was clipped in the PNG."""
    from trainer.measure import plots

    seen = {}
    real_save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (fig.tight_layout(), seen.update(
        fig=fig, boxes=[ax.title.get_window_extent(fig.canvas.get_renderer())
                        for ax in fig.axes]), real_save(fig, path))[-1])
    lat = {"batches": [{"batch": b, "ms_per_batch": 1.0, "speedup": 1.5} for b in (1, 256)]}
    rows = [{"label": name, "best_acc": 50.0, "params": p, "macs": p * 10, "latency": lat,
             "mac_speedup": s, "baseline": i == 0}
            for i, (name, p, s) in enumerate([("original (sparse-trained)", 2e6, 1.0),
                                              ("pruned ratio 0.5 + fine-tuned", 1e6, 2.0),
                                              ("pruned ratio 0.9 + fine-tuned", 2e5, 10.0)])]
    plots.plot_comparison(rows, tmp_path / "c.png")
    width = seen["fig"].bbox.width
    assert len(seen["boxes"]) == 4
    assert all(0 <= box.x0 and box.x1 <= width for box in seen["boxes"])

"""pipeline with budgets, several prune -> fine-tune rounds and a distillation teacher, through
the real CLI: every round's files and report row, and a kill mid-round resumed with --resume
ending exactly as the run that was not killed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests._faults import env
from tests.helpers import run_cli
from trainer.files.checkpoint import load_checkpoint

ROUNDS = ["pipeline", "--arch", "resnet18", "--dataset", "synthetic", "--cpu",
          "--targets", "6M,3M", "--passes", "2", "--kd", "--round-to", "4",
          "--train-epochs", "1", "--finetune-epochs", "2", "--synthetic-train", "64",
          "--synthetic-test", "32", "--batch-size", "16", "--finetune-batch-size", "16",
          "--num-workers", "0", "--workdir", "w"]
FILES = [f"model_prune_{t}_p{p}{s}.pth" for t in ("6M", "3M") for p in (1, 2)
         for s in ("", "_finetune")]


def _run(folder: Path, *extra: str, faults: dict | None = None):
    folder.mkdir(exist_ok=True)
    return run_cli(*ROUNDS, *extra, cwd=folder, timeout=900, env=env(**(faults or {})))


@pytest.mark.slow  # two short studies of 4 rounds each, ~1-2 min
def test_budgets_in_rounds_with_a_teacher_resume_after_a_kill_mid_round(tmp_path):
    whole = _run(tmp_path / "whole")
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    ck = tmp_path / "whole" / "w" / "checkpoints"
    assert {f for f in FILES if (ck / f).exists()} == set(FILES)
    for tag, budget in (("6M", 6e6), ("3M", 3e6)):
        final = load_checkpoint(ck / f"model_prune_{tag}_p2_finetune.pth")
        assert sum(v.numel() for k, v in final["state_dict"].items()
                   if k.endswith(("weight", "bias")) and "running" not in k) <= budget
        assert final["config"]["teacher"].endswith("model_sparse.pth")  # --kd
        assert final["config"]["sparsity"] == 0.0  # the last round without λ
        first = load_checkpoint(ck / f"model_prune_{tag}_p1_finetune.pth")
        assert first["config"]["sparsity"] > 0  # an earlier round keeps λ
        p1 = load_checkpoint(ck / f"model_prune_{tag}_p1.pth")["prune"]
        p2 = load_checkpoint(ck / f"model_prune_{tag}_p2.pth")["prune"]
        assert p2["params_after"] <= budget < p1["params_after"] < p1["params_before"]
    report = (tmp_path / "whole" / "w" / "report.md").read_text()
    rows = [ln for ln in report.splitlines() if ln.startswith("| 6M params |")
            or ln.startswith("| 3M params |")]
    assert len(rows) == 4  # a row per round

    # killed while writing round 2's fine-tune state of the first budget, then resumed
    killed = _run(tmp_path / "killed", faults={
        "SLIMTUNE_TEST_KILL_IN_SAVE": "model_prune_6M_p2_finetune.last.pth:1"})
    assert killed.returncode != 0
    resumed = _run(tmp_path / "killed", "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    for name in FILES + ["model_sparse.pth"]:
        a = load_checkpoint(ck / name)
        b = load_checkpoint(tmp_path / "killed" / "w" / "checkpoints" / name)
        assert a.get("history") == b.get("history"), name
        assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])

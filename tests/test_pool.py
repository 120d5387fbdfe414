"""The pool of jobs (launch.pool, launch.study): jobs side by side on disjoint GPU sets with
their own ports and logs, a queue, failure isolation, Ctrl-C and --resume, progress as lines
or a live table. The fast tests run fake jobs (small Python scripts that print what ``fit``
prints); the slow ones run real studies on the synthetic set."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from launch.pool import Job, Pool
from tests.helpers import REPO, cli_env, run_cli

FAKE = """
import os, sys, time
from pathlib import Path
count = Path(sys.argv[1] + ".runs")
count.write_text(str(int(count.read_text()) + 1 if count.exists() else 1))
print("== 3. fine-tune something (2 epochs)", flush=True)
print("gpus", os.environ.get("CUDA_VISIBLE_DEVICES"), "threads",
      os.environ.get("OMP_NUM_THREADS"), "port", sys.argv[4:], flush=True)
for e in (1, 2):
    time.sleep(float(sys.argv[2]))
    print(f"epoch {e}/2  lr 1e-3  train loss 1.0 acc 50.00%  test loss 0.9 acc {60 + e:.2f}%",
          flush=True)
if int(sys.argv[3]):
    print("error: --checkpoint broken.pth is not a checkpoint; give a .pth file", flush=True)
    sys.exit(int(sys.argv[3]))
Path(sys.argv[1]).write_text("done")
"""


def fake_job(tmp: Path, name: str, *, sleep: float = 0.3, code: int = 0, gpus: int = 1,
             deps: tuple[str, ...] = (), port: bool = False) -> Job:
    """A job that prints a stage header and two epoch lines (``sleep`` s apart), writes
    <tmp>/<name>.out (unless it fails with ``code``) and counts its runs in <name>.out.runs."""
    out = tmp / f"{name}.out"
    return Job(name, [sys.executable, "-c", FAKE, str(out), str(sleep), str(code)],
               tmp / "logs" / f"{name}.log", gpus=gpus, deps=deps, epochs=2, outputs=(out,),
               port=port)


def record(tmp: Path) -> dict[str, dict]:
    return {j["name"]: j for j in json.loads((tmp / "logs" / "jobs.json").read_text())["jobs"]}


def overlap(a: dict, b: dict) -> float:
    """Seconds jobs ``a`` and ``b`` (records) ran at the same time."""
    return min(a["end"], b["end"]) - max(a["start"], b["start"])


def test_jobs_run_side_by_side_on_disjoint_gpus_and_the_rest_wait(tmp_path, capsys):
    jobs = [fake_job(tmp_path, n, gpus=2, port=True) for n in ("a", "b", "c")]
    out = io.StringIO()
    pool = Pool(jobs, gpus=["0", "1", "2", "3"], slots=2, threads=3, logs=tmp_path / "logs",
                console=Console(file=out, width=200))
    assert pool.run() == 0
    rec = record(tmp_path)
    assert {n: r["state"] for n, r in rec.items()} == {"a": "done", "b": "done", "c": "done"}
    assert overlap(rec["a"], rec["b"]) > 0.3  # both ran at once...
    assert rec["c"]["start"] >= min(rec["a"]["end"], rec["b"]["end"])  # ...c waited for a slot
    assert set(rec["a"]["gpus"]).isdisjoint(rec["b"]["gpus"])
    assert len(rec["a"]["gpus"]) == 2 and len({r["port"] for r in rec.values()}) == 3
    log = (tmp_path / "logs" / "a.log").read_text()
    assert f"gpus {','.join(rec['a']['gpus'])} threads 3" in log
    assert f"'--main-process-port', '{rec['a']['port']}'" in log  # each its own port
    text = out.getvalue()
    for name in "abc":  # no terminal: one line per job per epoch
        for epoch, acc in ((1, 61), (2, 62)):
            assert text.count(f"{name}: fine-tune something (2 epochs): epoch {epoch}/2, "
                              f"test acc {acc}.00%") == 1, text


def test_a_failed_job_stops_only_what_needs_it_and_the_summary_names_it(tmp_path, capsys):
    jobs = [fake_job(tmp_path, "bad", code=2), fake_job(tmp_path, "good"),
            fake_job(tmp_path, "after_bad", deps=("bad",)),
            fake_job(tmp_path, "after_good", deps=("good",))]
    code = Pool(jobs, gpus=None, slots=2, threads=1, logs=tmp_path / "logs",
                console=Console(file=io.StringIO())).run()
    assert code == 1
    states = {n: r["state"] for n, r in record(tmp_path).items()}
    assert states == {"bad": "failed", "good": "done", "after_bad": "skipped",
                      "after_good": "done"}
    assert (tmp_path / "good.out").exists() and (tmp_path / "after_good.out").exists()
    assert not (tmp_path / "after_bad.out.runs").exists()  # never started
    err = capsys.readouterr().err
    assert f"error: job bad failed (exit code 2); the last lines of its log " \
           f"{tmp_path / 'logs' / 'bad.log'}:" in err
    assert "    error: --checkpoint broken.pth is not a checkpoint" in err  # its log's tail
    assert "1 of 4 jobs failed (bad); good, after_good finished and kept their files" in err


DRIVER = """
import sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from launch.pool import Job, Pool
tmp, fake = Path(sys.argv[1]), Path(sys.argv[4]).read_text()

def job(name, sleep, deps=()):
    out = tmp / f"{{name}}.out"
    return Job(name, [sys.executable, "-c", fake, str(out), str(sleep), "0"],
               tmp / "logs" / f"{{name}}.log", deps=deps, epochs=2, outputs=(out,))

jobs = [job("quick", 0.1), job("slow", float(sys.argv[3])), job("last", 0.1, ("quick", "slow"))]
sys.exit(Pool(jobs, gpus=None, slots=2, threads=1, logs=tmp / "logs",
              resume=sys.argv[2] == "1").run())
"""


def _driver(tmp: Path, resume: bool, sleep: float) -> subprocess.Popen:
    """A launcher (its own process group, as a shell runs it) of three fake jobs."""
    (tmp / "fake.py").write_text(FAKE)
    return subprocess.Popen([sys.executable, "-c", DRIVER.format(repo=str(REPO)), str(tmp),
                             "1" if resume else "0", str(sleep), str(tmp / "fake.py")],
                            cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_ctrl_c_stops_every_job_and_resume_skips_the_finished_ones(tmp_path):
    proc = _driver(tmp_path, False, 30)
    log = tmp_path / "logs" / "slow.log"
    deadline = time.monotonic() + 60
    while not ((tmp_path / "quick.out").exists() and log.exists()
               and "== 3." in log.read_text()):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the launcher's group
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, err
    states = {n: r["state"] for n, r in record(tmp_path).items()}
    assert states == {"quick": "done", "slow": "stopped", "last": "not started"}
    assert "stopped by SIGINT: slow stopped; last not started; continue with the same " \
           "command plus --resume" in err

    resumed = _driver(tmp_path, True, 0.1)
    out, err = resumed.communicate(timeout=60)
    assert resumed.returncode == 0, err
    assert "quick: done earlier, its files unchanged; not run again" in out
    states = {n: r["state"] for n, r in record(tmp_path).items()}
    assert states == {"quick": "done earlier", "slow": "done", "last": "done"}
    runs = {n: int((tmp_path / f"{n}.out.runs").read_text()) for n in ("quick", "slow", "last")}
    assert runs == {"quick": 1, "slow": 2, "last": 1}
    assert "run again with --resume" in log.read_text()  # one log, both runs


def test_on_a_terminal_progress_is_one_live_table(tmp_path):
    out = io.StringIO()
    jobs = [fake_job(tmp_path, "50"), fake_job(tmp_path, "90", code=1)]
    console = Console(file=out, force_terminal=True, width=120, color_system=None)
    assert Pool(jobs, gpus=["0", "1"], slots=2, threads=1, logs=tmp_path / "logs",
                console=console).run() == 1
    text = out.getvalue()
    header = next(ln for ln in text.splitlines() if "job" in ln and "stage" in ln)
    for col in ("state", "GPUs", "epoch", "test acc", "time", "ETA"):
        assert col in header
    final = text[text.rindex("jobs"):]  # the table as the study ended
    row50 = next(ln for ln in final.splitlines() if "│ 50 " in ln)
    assert "done" in row50 and "fine-tune something" in row50 and "2/2" in row50
    assert "62.00%" in row50
    assert "failed" in next(ln for ln in final.splitlines() if "│ 90 " in ln)
    assert "epoch 1/2, test acc" not in text  # no per-epoch lines on a terminal


# ------------------------------------------------------------------ planning a study


def _dry(*extra: str, tmp: Path, monkeypatch, visible: int | None = None) -> str:
    if visible is not None:  # a machine with `visible` GPUs (counted without torch)
        import launch.study

        monkeypatch.setattr(launch.study, "count_gpus", lambda dry_run, environ: visible)
    r = run_cli("pipeline", "--dataset", "synthetic", "--ratios", "0.3,0.5,0.7,0.9",
                "--workdir", "w", "--dry-run", *extra, cwd=tmp)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _planned(text: str) -> dict[str, tuple[list[str], str, str]]:
    """job -> (its GPUs, port, command) from the dry-run text."""
    lines, out = text.splitlines(), {}
    for head, command in zip(lines[1::2], lines[2::2]):
        name = head.split()[2].rstrip(":")
        gpus = head.split("GPUs ")[1].split(", port")[0].split(",") if "GPUs " in head else []
        port = head.split("port ")[1].split(",")[0]
        out[name] = (gpus, port, command)
    return out


@pytest.mark.parametrize("extra,visible", [(["--gpus-per-job", "2"], 4),
                                           (["--gpus", "4", "--gpus-per-job", "2"], None)])
def test_dry_run_shows_disjoint_gpus_and_distinct_ports(tmp_path, monkeypatch, extra, visible):
    text = _dry(*extra, tmp=tmp_path, monkeypatch=monkeypatch, visible=visible)
    assert text.startswith("# 6 jobs on GPUs 0,1,2,3, 2 per job, at most 2 at once")
    jobs = _planned(text)
    assert list(jobs) == ["sparse", "30", "50", "70", "90", "report"]
    assert jobs["sparse"][0] == ["0", "1", "2", "3"]
    # the chains run two at a time: each pair side by side on disjoint GPUs
    for a, b in (("30", "50"), ("70", "90")):
        assert len(jobs[a][0]) == 2 and set(jobs[a][0]).isdisjoint(jobs[b][0])
    ports = [p for g, p, _ in jobs.values() if len(g) > 1]
    assert len(ports) == 5 and len(set(ports)) == 5 and all(p.isdigit() for p in ports)
    for name, (gpus, port, command) in jobs.items():
        assert command.startswith(f"CUDA_VISIBLE_DEVICES={','.join(gpus)} ")
        assert command.endswith(f"--job {name} --gpus {len(gpus)}"
                                + (f" --main-process-port {port}" if len(gpus) > 1 else ""))


def test_cpu_jobs_split_the_cores(tmp_path, monkeypatch):
    text = _dry("--cpu", "--jobs", "2", tmp=tmp_path, monkeypatch=monkeypatch)
    assert text.splitlines()[0].startswith("# 6 jobs on the CPU, 2 at once")
    assert "CUDA_VISIBLE_DEVICES" not in text
    jobs = _planned(text)
    assert all(cmd.split()[0].startswith("OMP_NUM_THREADS=") for _, _, cmd in jobs.values())


# ------------------------------------------------------------------ real studies

STUDY = ["pipeline", "--arch", "resnet18", "--dataset", "synthetic", "--image-size", "16",
         "--cpu", "--ratios", "0.5,0.9", "--train-epochs", "1", "--finetune-epochs", "2",
         "--synthetic-train", "64", "--synthetic-test", "32", "--batch-size", "16",
         "--finetune-batch-size", "16", "--num-workers", "0", "--workdir", "w"]
MADE = ["model_sparse.pth", "model_prune_50.pth", "model_prune_50_finetune.pth",
        "model_prune_90.pth", "model_prune_90_finetune.pth"]


def _study(folder: Path, *extra: str, env: dict | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    return run_cli(*STUDY, *extra, cwd=folder, timeout=900, env=env, process=True)


@pytest.fixture(scope="module")
def pooled(tmp_path_factory) -> Path:
    """A study run as a pool of 2 CPU jobs at once (each 1 thread: OMP_NUM_THREADS=1)."""
    folder = tmp_path_factory.mktemp("pooled")
    r = _study(folder, "--jobs", "2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (folder / "stdout.txt").write_text(r.stdout)
    return folder / "w"


def _same_study(a: Path, b: Path, exact: bool = True) -> None:
    """The two studies' checkpoints: same widths, history and (``exact``) weights; the same
    report rows."""
    import torch

    from trainer.files.checkpoint import load_checkpoint

    for name in MADE:
        x, y = (load_checkpoint(w / "checkpoints" / name) for w in (a, b))
        assert x.get("cfg") == y.get("cfg") and x.get("history") == y.get("history"), name
        if exact:
            assert all(torch.equal(x["state_dict"][k], y["state_dict"][k])
                       for k in x["state_dict"]), name

    def rows(w: Path) -> list[str]:  # the study's table: its numbers, not the timings
        return [ln for ln in (w / "report.md").read_text().splitlines()
                if ln.startswith("| ratio ")]

    assert rows(a) and rows(a) == rows(b)


@pytest.mark.slow  # two short studies, ~1.5 min on 2 cores
def test_a_pooled_study_runs_its_chains_at_once_and_equals_the_sequential_one(pooled, tmp_path):
    jobs = {j["name"]: j for j in json.loads((pooled / "logs" / "jobs.json").read_text())["jobs"]}
    assert [j["state"] for j in jobs.values()] == ["done"] * 4
    assert overlap(jobs["50"], jobs["90"]) > 1.0  # the two chains ran side by side
    assert jobs["report"]["start"] >= max(jobs["50"]["end"], jobs["90"]["end"])
    assert jobs["50"]["start"] >= jobs["sparse"]["end"]
    stdout = (pooled.parent / "stdout.txt").read_text()
    for tag in ("50", "90"):  # no terminal: a line per job per epoch
        for epoch in (1, 2):
            assert sum(ln.startswith(f"{tag}: fine-tune model_prune_{tag}.pth (2 epochs): "
                                     f"epoch {epoch}/2, test acc ")
                       for ln in stdout.splitlines()) == 1, stdout
    assert "report: w/report.md" in stdout  # where the study's results are
    sequential = _study(tmp_path)
    assert sequential.returncode == 0, sequential.stderr[-3000:]
    _same_study(pooled, tmp_path / "w")  # 1 thread each: the very same numbers


@pytest.mark.slow  # a study stopped in its chains and resumed, ~1 min
def test_ctrl_c_then_resume_ends_as_the_uninterrupted_study(pooled, tmp_path):
    from tests._faults import env

    tmp_path.mkdir(exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "launch", *STUDY, "--jobs", "2"],
                            cwd=tmp_path, env=env(SLIMTUNE_TEST_STEP_SLEEP="0.3"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    log, deadline = tmp_path / "w" / "logs" / "50.log", time.monotonic() + 300
    while not (log.exists() and "epoch 1/2" in log.read_text()):  # mid fine-tune
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    states = {j["name"]: j["state"] for j in
              json.loads((tmp_path / "w" / "logs" / "jobs.json").read_text())["jobs"]}
    assert states["sparse"] == "done" and states["50"] == "stopped", states
    assert states["report"] == "not started"
    assert "continue with the same command plus --resume" in err

    resumed = _study(tmp_path, "--jobs", "2", "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "sparse: done earlier, its files unchanged; not run again" in resumed.stdout
    assert "epoch 1/2" not in log.read_text().split("run again with --resume")[-1]
    _same_study(pooled, tmp_path / "w")


@pytest.mark.slow  # one short study, ~40 s
def test_a_failed_chain_leaves_the_other_complete(tmp_path):
    study = [a for a in STUDY if a not in ("--ratios", "0.5,0.9")]
    tmp_path.mkdir(exist_ok=True)
    r = run_cli(*study, "--targets", "6M,1K", "--finetune-epochs", "1", "--jobs", "2",
                cwd=tmp_path, timeout=900, process=True)  # 1K: below any pruned model
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    states = {j["name"]: j["state"] for j in
              json.loads((tmp_path / "w" / "logs" / "jobs.json").read_text())["jobs"]}
    assert states == {"sparse": "done", "6M": "done", "1K": "failed", "report": "skipped"}
    ck = tmp_path / "w" / "checkpoints"
    assert (ck / "model_prune_6M.pth").exists() and (ck / "model_prune_6M_finetune.pth").exists()
    assert not (ck / "model_prune_1K.pth").exists()
    assert "error: job 1K failed (exit code 2); the last lines of its log" in r.stderr
    assert "cannot be met" in r.stderr  # the job's own error line, from its log
    assert "1 of 4 jobs failed (1K); sparse, 6M finished and kept their files" in r.stderr


@pytest.mark.slow  # the SLURM array's tasks run here one after another, ~1 min
def test_the_slurm_script_is_valid_and_its_tasks_make_the_pool_s_files(pooled, tmp_path):
    r = _study(tmp_path, "--jobs", "2", "--slurm", "job.sh")
    assert r.returncode == 0, r.stderr
    assert "wrote job.sh: 4 SLURM array tasks in 3 steps" in r.stdout
    script = tmp_path / "job.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "--array=0 " in text and "--array=1-2 " in text and "--array=3 " in text
    assert "--dependency=afterok:$after" in text and "--dependency=afterany:$after" in text
    for task in range(4):  # the steps' order: sparse, the two chains, the report
        done = subprocess.run(["bash", str(script)], cwd=tmp_path, capture_output=True,
                              text=True, env=cli_env(SLURM_ARRAY_TASK_ID=str(task)))
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    _same_study(pooled, tmp_path / "w")


def test_a_sweep_shares_the_sparse_stage_of_points_that_differ_later(tmp_path, monkeypatch):
    r = run_cli("sweep", "--dataset", "synthetic", "--cpu", "--jobs", "2", "--ratios", "0.5",
                "--sparsity", "1e-5,1e-4", "--kd", "--kd-alpha", "0.5,0.9", "--workdir", "w",
                "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    jobs = _planned(r.stdout)
    points = ["sparsity1e-05_kd_alpha0.5", "sparsity1e-05_kd_alpha0.9",
              "sparsity0.0001_kd_alpha0.5", "sparsity0.0001_kd_alpha0.9"]
    assert [j for j in jobs if j.endswith("/sparse")] == [f"{points[0]}/sparse",
                                                           f"{points[2]}/sparse"]
    assert f"# job {points[1]}/50 (after {points[0]}/sparse)" in r.stdout
    for p in points:
        assert f"--workdir w/{p} " in jobs[f"{p}/50"][2] and "--kd-alpha 0" in jobs[f"{p}/50"][2]
    last = jobs["report"][2]
    assert "sweep " in last and "--sparsity 1e-05,0.0001" in last and "--kd-alpha 0.5,0.9" in last
    assert last.endswith("--job report")


@pytest.mark.slow  # a sweep of two short studies, ~1.5 min
def test_a_sweep_writes_one_report_and_figure(tmp_path):
    study = [a for a in STUDY if a != "pipeline"]
    r = run_cli("sweep", *study, "--sparsity", "1e-5,1e-4", "--ratios", "0.5",
                "--finetune-epochs", "1", "--jobs", "2", cwd=tmp_path, timeout=900,
                process=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = (tmp_path / "w" / "sweep.md").read_text()
    rows = [ln for ln in report.splitlines() if ln.startswith("| sparsity")]
    assert [ln.split(" | ")[1:3] for ln in rows] == [["1e-05", "ratio 0.5"],
                                                      ["0.0001", "ratio 0.5"]]
    assert all(float(ln.split(" | ")[3]) > 0 and float(ln.split(" | ")[-1].rstrip(" |")) >= 0
               for ln in rows)  # params (M), best accuracy
    assert (tmp_path / "w" / "plots" / "sweep.png").stat().st_size > 10_000
    for point in ("sparsity1e-05", "sparsity0.0001"):
        assert (tmp_path / "w" / point / "report.md").exists()
    assert "sweep report: w/sweep.md" in r.stdout

"""Multi-process runs end to end on the CPU (gloo): the launcher, ``accelerate launch``,
``torchrun``, exact metrics over ranks, a failing rank, two machines on loopback, DP, dry run.

Every run is tiny (fake CIFAR-10 of 5 x 20 train images, a width-4 pruned ResNet-50,
``--limit-batches 2``); the subprocess start-up dominates. Facts each test relies on:
the worker saves ``config.num_processes = accelerator.num_processes`` in the checkpoint, so a
saved 2 proves both ranks joined one process group.
"""

from __future__ import annotations

import csv
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from launch import supervise
from launch.accelerate_config import build_accelerate_config
from launch.plan import free_port
from tests.fakedata import truncate_file, write_fake_cifar10
from tests.helpers import FAST, REPO, cli_env, communicate_all, make_small_checkpoint, run_cli
from trainer.config.settings import RunConfig
from trainer.files.checkpoint import (
    build_model,
    load_checkpoint,
    make_checkpoint,
    safe_torch_load,
)

CPU_DDP_YAML = REPO / "configs" / "accelerate" / "cpu_ddp_2proc.yaml"
N_TEST = 31  # odd: 2 ranks cannot split it evenly, so Accelerate pads the last batch
TIMEOUT = 240  # seconds per subprocess; far above the ~10-20 s a run takes here


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> SimpleNamespace:
    """A small checkpoint whose predictions vary by image, and fake CIFAR-10 (31 test images)."""
    root = tmp_path_factory.mktemp("inputs")
    data = root / "data"
    write_fake_cifar10(data, n_per_batch=20, n_test=N_TEST)
    # seed 2: the random model predicts several classes (9/31 right), so a dropped or
    # duplicated test image would show in the correct count as well as in the loss.
    ckpt = make_small_checkpoint(root / "small.pth", seed=2)
    return SimpleNamespace(data=data, ckpt=ckpt)


def data_args(inputs: SimpleNamespace) -> list[str]:
    return ["--dataset", "cifar10", "--data-dir", str(inputs.data), "--no-download", *FAST]


def finetune_args(inputs: SimpleNamespace, out: Path, epochs: int = 1) -> list[str]:
    return ["finetune", "--checkpoint", str(inputs.ckpt), *data_args(inputs),
            "--epochs", str(epochs), "--limit-batches", "2",
            "--output", str(out / "x.pth"), "--plot", str(out / "x.png")]


def run(argv: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=env or cli_env(), capture_output=True, text=True,
                          timeout=TIMEOUT, check=False)


def ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def check_finetune_output(out: Path, data_dir: Path, epochs: int,
                          extra_files: set[str] = frozenset()) -> dict:
    """One best checkpoint, one plot, resume state and CSV; both made by a 2-process world."""
    assert {p.name for p in out.iterdir()} == {"x.pth", "x.last.pth", "x_metrics.csv",
                                               "x.png", *extra_files}
    ckpt = load_checkpoint(out / "x.pth")
    assert ckpt["config"]["num_processes"] == 2  # the worker's Accelerator saw 2 processes
    best = ckpt["best_epoch"]
    assert ckpt["history"]["epoch"] == list(range(1, best + 1))  # "history so far" at the best
    assert ckpt["best_acc"] == max(ckpt["history"]["test_acc"])
    last = safe_torch_load(out / "x.last.pth", what="resume state")
    assert last["history"]["epoch"] == list(range(1, epochs + 1))
    assert last["config"]["num_processes"] == 2
    with (out / "x_metrics.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == epochs
    assert (out / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The 2-process evaluation of the best epoch == this process's pass over all 31 images
    # with the saved weights (rank 0's, BN statistics included).
    truth = expected_metrics(out / "x.pth", data_dir)
    assert ckpt["history"]["test_acc"][best - 1] == truth["accuracy"]
    assert ckpt["history"]["test_loss"][best - 1] == pytest.approx(truth["loss"], rel=1e-5)
    return ckpt


def load_accelerate_config(path: Path):
    """Parse with Accelerate's own loader (imported lazily: the gloo test's ranks import
    this module and need none of it)."""
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(path))


# ------------------------------------------------------------------ real 2-process runs


@pytest.mark.slow  # ~15-30 s each on a busy 2-core machine
@pytest.mark.parametrize("loader", ["torch", "gpu"])  # gpu: the CUDA default, on CPU tensors
def test_launcher_gpus2_cpu_finetunes_with_two_processes(inputs, tmp_path, loader):
    out = tmp_path / "out"
    result = run_cli(*finetune_args(inputs, out, epochs=2), "--gpus", "2", "--loader", loader,
                     cwd=tmp_path, timeout=TIMEOUT)
    ok(result)
    yaml_name = "accelerate_cpu_ddp_2proc.yaml"  # the config it used, kept beside the output
    ckpt = check_finetune_output(out, inputs.data, epochs=2, extra_files={yaml_name})
    assert ckpt["config"]["loader"] == loader
    used = load_accelerate_config(out / yaml_name)
    assert used.num_processes == 2 and used.use_cpu
    assert used.distributed_type.value == "MULTI_GPU"  # MULTI_CPU would start ONE process
    printed = result.stdout + result.stderr
    for epoch in (1, 2):  # one progress display: only rank 0 prints
        assert printed.count(f"epoch {epoch}/2 ") == 1, printed[-2000:]
    assert "had defaults used instead" not in printed  # nothing left to Accelerate's defaults
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing else written


@pytest.mark.slow  # ~15-30 s each on a busy 2-core machine
@pytest.mark.parametrize("starter", ["accelerate", "torchrun"])
def test_worker_runs_under_accelerate_launch_and_torchrun(inputs, tmp_path, starter):
    out = tmp_path / "out"
    worker = ["-m", "trainer", *finetune_args(inputs, out)]
    if starter == "accelerate":
        argv = [sys.executable, "-m", "accelerate.commands.launch",
                "--config_file", str(CPU_DDP_YAML), *worker]
        env = cli_env(ACCELERATE_USE_CPU="true")
    else:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2", *worker]
        env = cli_env()
        env.pop("ACCELERATE_USE_CPU", None)  # --cpu alone must be enough under torchrun
    ok(run(argv, tmp_path, env))
    check_finetune_output(out, inputs.data, epochs=1)


# ------------------------------------------------------------------ exact metrics


def expected_metrics(ckpt: Path, data_dir: Path) -> dict:
    """Loss/accuracy over the whole test set, computed here in one plain forward pass."""
    from trainer.data.datasets import build_datasets

    model = build_model(load_checkpoint(ckpt)).eval()
    test = build_datasets("cifar10", str(data_dir), download=False).test
    x = torch.stack([test[i][0] for i in range(len(test))])
    y = torch.tensor([test[i][1] for i in range(len(test))])
    with torch.no_grad():
        out = model(x)
    correct = int((out.argmax(1) == y).sum())
    return {"loss": F.cross_entropy(out, y).item(), "correct": correct, "total": len(y),
            "accuracy": 100.0 * correct / len(y)}


def evaluate_json(inputs: SimpleNamespace, cwd: Path, variants: list[list[str]]) -> list[dict]:
    """``python -m launch evaluate CKPT --json`` once per variant, run side by side."""
    base = [sys.executable, "-m", "launch", "evaluate", str(inputs.ckpt), "--json",
            *data_args(inputs)]
    procs = [subprocess.Popen(base + extra, cwd=cwd, env=cli_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for extra in variants]
    outputs = communicate_all(procs, TIMEOUT)
    results = []
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, out[-2000:] + err[-2000:]
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        assert len(lines) == 1, out  # printed once, by rank 0
        results.append(json.loads(lines[0]))
    return results


@pytest.mark.slow  # three evaluate runs side by side, ~10-30 s
def test_two_process_evaluate_counts_every_test_image_exactly_once(inputs, tmp_path):
    truth = expected_metrics(inputs.ckpt, inputs.data)
    assert truth["total"] == N_TEST and 0 < truth["correct"] < N_TEST
    # 1 process; 2 processes of 10 (last batches 10 + 1, padded); 2 processes of 1 image per
    # batch (rank 1's 16th batch is pure padding); 2 processes with the gpu loader's exact,
    # unpadded slices (15 + 16 images).
    results = evaluate_json(inputs, tmp_path, [[], ["--gpus", "2"],
                                               ["--gpus", "2", "--batch-size", "2"],
                                               ["--gpus", "2", "--loader", "gpu"]])
    for got in results:
        assert (got["correct"], got["total"]) == (truth["correct"], N_TEST), got
        assert got["accuracy"] == truth["accuracy"]
        assert got["loss"] == pytest.approx(truth["loss"], rel=1e-5)
    # evaluate has no output file: its launch config goes to <workdir>/checkpoints/.
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert written == ["checkpoints", "checkpoints/accelerate_cpu_ddp_2proc.yaml"]


@pytest.mark.slow  # ~10 s
def test_a_two_process_job_runs_while_port_29500_is_taken(inputs, tmp_path):
    """Accelerate probes its default port and torchrun binds it later: a socket sitting there
    without listening (or a second job started at the same moment, seen in CI) made the job
    fail with EADDRINUSE. The launcher gives each one-machine job a free port."""
    with socket.socket() as blocker:
        try:
            blocker.bind(("", 29500))
        except OSError:
            pytest.skip("port 29500 is already in use on this machine")
        (got,) = evaluate_json(inputs, tmp_path, [["--gpus", "2"]])
    assert got["total"] == N_TEST


# ------------------------------------------------------------------ engine over a gloo world


def _tiny_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))


def _rank_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank 0 holds 3 images, rank 1 holds 5: unequal, so a mean of rank means is wrong."""
    g = torch.Generator().manual_seed(100 + rank)
    n = 3 + 2 * rank
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def _checksum(model: nn.Module) -> float:
    return float(sum(p.double().sum() for p in model.parameters()))


def gloo_rank_main() -> dict:
    """One rank of test_train_metrics_average_all_ranks (started by it in a subprocess)."""
    from trainer.models.family import unwrap_model
    from trainer.train.loop import make_optimizer, train_one_epoch
    from trainer.train.runtime import end_run, make_accelerator, prepare_model

    cfg = RunConfig(cpu=True, optimizer="sgd", lr=0.1, momentum=0.0, epochs=1, dist_timeout=60)
    accelerator = make_accelerator(cfg)
    torch.manual_seed(cfg.seed)
    model = _tiny_model()
    initial = _checksum(model)
    optimizer = make_optimizer(model, cfg)
    model, optimizer = prepare_model(model, cfg, accelerator, optimizer)
    metrics = train_one_epoch(model, [_rank_batch(accelerator.process_index)], optimizer,
                              accelerator=accelerator, run=cfg, epoch=0)
    record = {"rank": accelerator.process_index, "world": accelerator.num_processes,
              "ddp": type(model).__name__, "initial": initial,
              "final": _checksum(unwrap_model(model)), **metrics}
    end_run(accelerator)  # as the worker does: no group destroy (it deadlocked on torch 2.4)
    return record


@pytest.mark.slow  # two python processes importing torch + accelerate, ~5-15 s
def test_train_metrics_average_all_ranks_samples_and_replicas_stay_equal(tmp_path):
    port = free_port()
    # trainer.__main__.leave: a gloo rank may abort in interpreter finalisation otherwise
    code = ("import json; from tests.test_distributed import gloo_rank_main; "
            "from trainer.__main__ import leave; "
            "print('RECORD ' + json.dumps(gloo_rank_main())); leave(0)")
    procs = []
    for rank in (0, 1):
        env = cli_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      ACCELERATE_USE_CPU="true")
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = communicate_all(procs, TIMEOUT)
    assert [p.returncode for p in procs] == [0, 0], outputs
    records = [json.loads(next(ln for ln in o.splitlines() if ln.startswith("RECORD "))[7:])
               for o, _ in outputs]
    # The expected numbers: the same seeded model, each rank's batch through it (train mode).
    torch.manual_seed(0)
    model = _tiny_model().train()
    losses, hits, counts = [], [], []
    with torch.no_grad():
        for rank in (0, 1):
            x, y = _rank_batch(rank)
            out = model(x)
            losses.append(F.cross_entropy(out, y).item() * len(y))
            hits.append(int((out.argmax(1) == y).sum()))
            counts.append(len(y))
    want_loss = sum(losses) / sum(counts)
    assert want_loss != pytest.approx((losses[0] / 3 + losses[1] / 5) / 2, rel=1e-3)
    for rec in records:
        assert rec["world"] == 2 and rec["ddp"] == "DistributedDataParallel"
        assert rec["train_samples"] == 8  # 3 + 5: every rank's samples
        assert rec["train_loss"] == pytest.approx(want_loss, rel=1e-6)
        assert rec["train_acc"] == pytest.approx(100.0 * sum(hits) / 8)
    assert records[0]["initial"] == records[1]["initial"]  # same seed, same initial model
    assert records[0]["final"] == records[1]["final"]  # replicas stay identical after a step
    assert records[0]["final"] != records[0]["initial"]


def test_torch_loader_augments_each_rank_differently():
    """Identical images at every index, so only augmentation can differ between ranks."""
    from trainer.data.common import ArrayDataset, Datasets, eval_transform, train_transform
    from trainer.data.loaders import make_train_loader

    images = torch.randint(0, 256, (1, 32, 32, 3), dtype=torch.uint8).repeat(16, 1, 1, 1)
    images, labels = images.numpy(), torch.zeros(16, dtype=torch.int64).numpy()
    mean, std = (0.5,) * 3, (0.25,) * 3
    ds = Datasets("same", ArrayDataset(images, labels, train_transform(32, mean, std)),
                  ArrayDataset(images, labels, eval_transform(32, mean, std)), 1, mean, std,
                  None, None)

    def first_batch(rank: int, seed: int = 0) -> torch.Tensor:
        loader = make_train_loader(ds, batch_size=8, num_workers=0, rank=rank, world_size=2,
                                   seed=seed)
        loader.set_epoch(0)
        return next(iter(loader))[0]

    r0, r1 = first_batch(0), first_batch(1)
    assert not torch.equal(r0, r1)  # per-rank augmentation streams
    assert torch.equal(r0, first_batch(0)) and torch.equal(r1, first_batch(1))  # reproducible
    assert not torch.equal(r0, first_batch(0, seed=1))


# ------------------------------------------------------------------ failures


@pytest.mark.slow  # ~10-25 s
def test_a_failing_rank_ends_the_job_quickly_and_is_named_last(inputs, tmp_path):
    out = tmp_path / "out"
    start = time.monotonic()
    result = run_cli(*finetune_args(inputs, out), "--gpus", "2", cwd=tmp_path,
                     env=cli_env(SLIMTUNE_TEST_FAIL_RANK="1"), timeout=TIMEOUT)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert elapsed < 60, f"the job took {elapsed:.0f} s to fail"
    last = result.stderr.strip().splitlines()[-1]
    assert last == ("error: rank 1 failed: RuntimeError: injected failure on rank 1 "
                    "(SLIMTUNE_TEST_FAIL_RANK)"), result.stderr[-2000:]
    assert not (out / "x.pth").exists()


@pytest.mark.slow  # the first case starts no process (~3 s); the second ~10-20 s
def test_bad_input_of_a_two_process_job_is_one_line(inputs, tmp_path):
    """Before: torchrun's ChildFailedError traceback, then the error once per rank (~45
    lines). Missing data is now found before any process starts (nothing written); a truncated
    CIFAR file, which only reading finds, is reported by every rank alike and printed once."""
    args = [*finetune_args(inputs, tmp_path / "out"), "--gpus", "2"]
    missing = run_cli(*[a if a != str(inputs.data) else "nope" for a in args], cwd=tmp_path,
                      timeout=TIMEOUT)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        "error: CIFAR-10 not found in nope (download disabled); put cifar-10-batches-py/ in "
        "nope or pass --data-dir"]
    assert list(tmp_path.iterdir()) == []  # not even the Accelerate config
    data = tmp_path / "data"
    write_fake_cifar10(data, n_per_batch=20, n_test=N_TEST)
    truncate_file(data / "cifar-10-batches-py" / "data_batch_3", 0.5)
    truncated = run_cli(*[a if a != str(inputs.data) else str(data) for a in args],
                        cwd=tmp_path, timeout=TIMEOUT)
    assert truncated.returncode == 2
    lines = [ln for ln in truncated.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {data}/cifar-10-batches-py/"
                                                   "data_batch_3 is truncated"), lines
    assert "Traceback" not in truncated.stdout + truncated.stderr


def test_preflight_refuses_what_every_rank_would(inputs, tmp_path):
    """The launcher's pre-flight: the ranks' own checks, made once, reading no dataset file."""
    from tests.fakedata import write_imagefolder
    from trainer.commands.train import preflight
    from trainer.errors import UserError

    write_imagefolder(tmp_path / "images", classes=3, per_class=2)
    base = RunConfig(command="finetune", checkpoint=str(inputs.ckpt), data_dir=str(inputs.data),
                     download=False)
    preflight(base)  # all there
    preflight(base.replace(data_dir=str(tmp_path / "none"), download=True))  # rank 0 fetches it
    preflight(base.replace(command="prune", data_dir=str(tmp_path / "none")))  # data optional
    for change, needle in [
        ({"checkpoint": str(tmp_path / "nope.pth")}, "nope.pth does not exist"),
        ({"data_dir": str(tmp_path / "none")}, "CIFAR-10 not found in"),
        ({"dataset": "imagefolder", "data_dir": str(tmp_path / "images")},
         "the imagefolder data has 3 classes but checkpoint"),
        ({"dataset": "imagefolder", "data_dir": str(tmp_path)}, "image folder"),
        ({"command": "train", "init": str(inputs.ckpt), "dataset": "cifar100"}, "CIFAR-100 not"),
        ({"dataset": "synthetic", "synthetic_train": 0}, "synthetic data needs"),
    ]:
        with pytest.raises(UserError, match=needle):
            preflight(base.replace(**change))


def test_report_of_the_same_bad_input_on_every_rank_is_one_line(tmp_path, capsys):
    for rank in (0, 1):
        (tmp_path / f"rank{rank}.txt").write_text("no data in d; pass --data-dir\nexit_code=2\n")
    assert supervise._report(1, None, tmp_path, range(2)) == 2
    assert capsys.readouterr().err.splitlines() == ["error: no data in d; pass --data-dir"]
    (tmp_path / "rank1.txt").write_text("no data in e; pass --data-dir\nexit_code=2\n")
    assert supervise._report(1, None, tmp_path, range(2)) == 2  # two messages: one per rank
    assert capsys.readouterr().err.splitlines() == [
        "error: rank 0 failed: no data in d; pass --data-dir",
        "error: rank 1 failed: no data in e; pass --data-dir"]


def test_report_puts_the_root_cause_last_and_returns_its_code(tmp_path, capsys):
    """Rank 0 fails first; rank 1 then only loses its peer. The last line must be rank 0."""
    (tmp_path / "rank0.txt").write_text("checkpoint y.pth is missing; pass --checkpoint\n"
                                        "exit_code=2\n")
    (tmp_path / "rank1.txt").write_text(
        "RuntimeError: [../gloo/transport/tcp/pair.cc:561] Connection closed by peer "
        "[127.0.0.1]:4242. This is typically caused by a remote worker crashing.\nexit_code=1\n")
    assert supervise._report(1, None, tmp_path) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == "error: rank 0 failed: checkpoint y.pth is missing; pass --checkpoint"
    assert lines[-2].startswith("error: rank 1 failed: RuntimeError: ") and \
        "Connection closed by peer" in lines[-2]


def test_report_names_a_silent_rank_after_peers_that_stopped_or_lost_it(tmp_path, capsys):
    """Rank 0 was SIGKILLed; the agent then SIGTERMed rank 1, which stopped at a step boundary
    (or lost its peer). Rank 0 wrote nothing: it is the root cause, named last."""
    (tmp_path / "rank1.txt").write_text("stopped by SIGTERM in epoch 2\nexit_code=143\n")
    assert supervise._report(1, None, tmp_path, range(2)) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-2] == "rank 1 stopped by SIGTERM in epoch 2"
    assert lines[-1].startswith("error: rank 0 died without reporting an error")


def test_report_of_a_stop_the_launcher_forwarded_is_one_line(tmp_path, capsys):
    for rank in (0, 1):
        (tmp_path / f"rank{rank}.txt").write_text("stopped by SIGINT in epoch 1\nexit_code=130\n")
    assert supervise._report(1, signal.SIGINT, tmp_path, range(2)) == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "stopped by SIGINT; the job exited with code 1"]


# ------------------------------------------------------------------ two machines on loopback


@pytest.mark.slow  # ~15-30 s
def test_two_machines_on_loopback_finetune_one_epoch(inputs, tmp_path):
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        node = ["--gpus", "1", "--num-machines", "2", "--machine-rank", str(rank),
                "--main-process-ip", "127.0.0.1", "--main-process-port", port]
        argv = [sys.executable, "-m", "launch",
                *finetune_args(inputs, tmp_path / f"out{rank}"), *node]
        procs.append(subprocess.Popen(argv, cwd=tmp_path, env=cli_env(), text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = [out for out, _ in communicate_all(procs, TIMEOUT)]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2500:] + outputs[1][-2500:]
    check_finetune_output(tmp_path / "out0", inputs.data, epochs=1,
                          extra_files={"accelerate_cpu_ddp_2proc_node0.yaml"})
    # Machine 1 runs global rank 1: it writes its launch config and nothing else.
    assert [p.name for p in (tmp_path / "out1").iterdir()] == [
        "accelerate_cpu_ddp_2proc_node1.yaml"]
    node1 = load_accelerate_config(tmp_path / "out1" / "accelerate_cpu_ddp_2proc_node1.yaml")
    assert (node1.num_processes, node1.num_machines, node1.machine_rank) == (2, 2, 1)
    assert "epoch 1/1" not in outputs[1]


# ------------------------------------------------------------------ DataParallel


def test_dp_with_cpu_processes_is_refused_in_one_line(inputs, tmp_path):
    result = run_cli(*finetune_args(inputs, tmp_path / "out"), "--mode", "dp", "--gpus", "2",
                     cwd=tmp_path, timeout=TIMEOUT)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        ("error: --mode dp splits batches over GPUs and cannot run with --cpu; "
         "use --mode ddp --cpu for several CPU processes")]
    assert list(tmp_path.iterdir()) == []


class _FakeCuda:
    """Stands in for a CUDA device on this CPU-only machine (only ``.type`` is read)."""

    type = "cuda"


class _Model(nn.Module):
    """The tiny model, ignoring moves to the fake CUDA device."""

    def __init__(self):
        super().__init__()
        self.net = _tiny_model()

    def to(self, *args, **kwargs):
        return self if args and isinstance(args[0], _FakeCuda) else super().to(*args, **kwargs)


def test_dp_wraps_after_prepare_so_saved_keys_have_no_prefix(monkeypatch, tmp_path):
    from trainer.train.runtime import prepare_model

    seen = []

    class Acc:
        device = _FakeCuda()

        def prepare(self, *objs):
            seen.extend(objs)
            return objs if len(objs) > 1 else objs[0]

    cfg = RunConfig(mode="dp", channels_last=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    model = _Model()
    assert prepare_model(model, cfg, Acc())[0] is model  # one GPU: nothing to split over
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    seen.clear()
    wrapped, _ = prepare_model(model, cfg, Acc())
    assert isinstance(wrapped, nn.DataParallel) and wrapped.module is model
    assert seen == [model]  # Accelerate got the bare model; DataParallel came after
    assert all(k.startswith("module.") for k in wrapped.state_dict())  # DP's own keys ...
    resnet = build_model(load_checkpoint(make_small_checkpoint(tmp_path / "s.pth")))
    saved = make_checkpoint(nn.DataParallel(resnet))["state_dict"]
    assert list(saved) == list(resnet.state_dict())  # ... never reach a checkpoint


# ------------------------------------------------------------------ dry run


def test_dry_run_prints_the_launch_and_yaml_and_writes_nothing(inputs, tmp_path):
    out = tmp_path / "out"
    result = run_cli(*finetune_args(inputs, out), "--gpus", "2", "--dry-run", cwd=tmp_path,
                     timeout=TIMEOUT)
    ok(result)
    assert list(tmp_path.iterdir()) == []  # no config, no checkpoint, no plots folder
    command, _, rest = result.stdout.partition("\n# accelerate config (would be written to ")
    assert command.startswith("ACCELERATE_USE_CPU=true ")
    path = str(out / "accelerate_cpu_ddp_2proc.yaml")
    assert (f"-m accelerate.commands.launch --config_file {path} --num_cpu_threads_per_process 1 "
            "-m trainer finetune") in command  # OMP_NUM_THREADS=1 (cli_env) is kept
    assert "--gpus" not in command and "--dry-run" not in command  # launcher-only options
    assert rest.startswith(path + "):\n")
    assert yaml.safe_load(rest.split("\n", 1)[1]) == build_accelerate_config(gpus=2, cpu=True)

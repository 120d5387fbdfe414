"""Nothing lost, nothing unsafe, nothing left running (issue 21; the guarantees of
docs/reliability.md): outputs that are locked and never clobbered, special files never
replaced, bounded messages, no orphaned ranks, image folders whose links loop, signals during
start-up, and the one-line errors where tracebacks were. The one-line refusals themselves are
rows of tests/test_bad_input.py (ROWS_FILES); here are the properties a row cannot show.

Device nodes and FIFOs are made in the test's own folder (``os.mknod`` needs root: a FIFO
stands in where it is refused), never a real /dev path.
"""

from __future__ import annotations

import io
import os
import signal
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from tests._faults import (
    descendants,
    env,
    finetune_args,
    make_shared,
    rank_pids,
    start,
    wait_for,
)
from tests.fakedata import truncate_file, write_imagefolder
from tests.helpers import FAST, cli_env, make_small_checkpoint, run_cli
from trainer.errors import CheckpointError, ConfigError, HardStop, StopRequested, UserError


def _one_line(result, *needles: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _device(path: Path) -> str:
    """A character device like /dev/null at ``path`` (a FIFO where mknod is not allowed);
    returns what it is."""
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        return "character device"
    except PermissionError:
        os.mkfifo(path)
        return "FIFO"


def _kind(path: Path) -> str:
    mode = os.lstat(path).st_mode
    return ("character device" if stat.S_ISCHR(mode) else "FIFO" if stat.S_ISFIFO(mode)
            else "regular" if stat.S_ISREG(mode) else "other")


# ---------------------------------------------------------------- 1. special files


def test_a_write_never_replaces_a_device_or_a_fifo(tmp_path):
    """The atomic write's os.replace put a regular file where /dev/null was."""
    from trainer.files.atomic import atomic_write_text

    dev, fifo = tmp_path / "mynull", tmp_path / "myfifo"
    kind = _device(dev)
    os.mkfifo(fifo)
    for node, what in ((dev, kind), (fifo, "FIFO")):
        with pytest.raises(ConfigError, match=f"is a {what}.*, not a regular file"):
            atomic_write_text(node, "x")
        assert _kind(node) == what
    assert sorted(p.name for p in tmp_path.iterdir()) == ["myfifo", "mynull"]  # no temp left
    link = tmp_path / "link"
    link.symlink_to(fifo)
    with pytest.raises(ConfigError, match="is a FIFO"):
        atomic_write_text(link, "x")
    (tmp_path / "file").write_text("old")
    (tmp_path / "to_file").symlink_to(tmp_path / "file")
    atomic_write_text(tmp_path / "to_file", "new")  # a link to a regular file is fine


@pytest.mark.parametrize("command", ["prune", "finetune", "export", "compare", "config"])
def test_every_command_refuses_a_special_output_before_any_work(tmp_path, command):
    make_small_checkpoint(tmp_path / "start.pth")
    kind = _device(tmp_path / "mynull")
    args = {"prune": ["prune", "--checkpoint", "start.pth", "--ratio", "0.5", "--no-eval",
                      "--cpu", "--output", "mynull"],
            "finetune": ["finetune", "--checkpoint", "start.pth", "--dataset", "synthetic",
                         "--cpu", "--output", "out/x.pth", "--plot", "mynull"],
            "export": ["export", "start.pth", "--format", "safetensors", "--output", "mynull"],
            "compare": ["compare", "start.pth", "--output", "mynull"],
            "config": ["config", "--gpus", "2", "--cpu", "--output", "mynull"]}[command]
    _one_line(run_cli(*args, cwd=tmp_path), f"mynull is a {kind}")
    assert _kind(tmp_path / "mynull") == kind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mynull", "start.pth"]


# ---------------------------------------------------------------- 2. bounded messages


def _bomb(path: Path, levels: int = 9) -> Path:
    names = "abcdefghijklmnop"[:levels]
    lines = [f'{names[0]}: &{names[0]} ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", '
             '"lol"]']
    lines += [f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]" for p, n in zip(names, names[1:])]
    path.write_text("\n".join(lines) + f"\ndistributed_type: *{names[-1]}\n")
    return path


def test_a_billion_laughs_config_is_refused_at_once(tmp_path):
    """Before: a 363-byte file gave a 2.1 GB error line after 85 s with 8.3 GB of memory."""
    from launch.user_config import load_user_config

    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"uses a YAML alias \(\*a on line 2\)") as err:
        load_user_config(_bomb(tmp_path / "bomb.yaml"))
    assert time.monotonic() - t0 < 1 and len(str(err.value)) < 200
    deep = tmp_path / "deep.yaml"  # no alias, nested past the parser's recursion
    deep.write_text("distributed_type: " + "[" * 20000 + "]" * 20000 + "\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_user_config(deep)
    big = tmp_path / "big.yaml"
    big.write_text("distributed_type: MULTI_GPU\n# " + "x" * (2 << 20) + "\n")
    with pytest.raises(ConfigError, match="is over 1,048,576 bytes"):
        load_user_config(big)
    long_value = tmp_path / "long.yaml"
    long_value.write_text(f"distributed_type: {'Y' * 100_000}\n")
    with pytest.raises(ConfigError) as err:
        load_user_config(long_value)
    assert len(str(err.value)) < 400 and "(100,002 characters)" in str(err.value)


def test_an_error_line_is_bounded_and_a_loader_workers_error_is_its_own_message():
    from trainer.cli.app import MAX_MESSAGE, from_loader_worker

    wrapped = ("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most "
               "recent call last):\n  File \"x.py\", line 1, in f\n    raise DataError(m)\n"
               "trainer.errors.DataError: cannot read image a.png (truncated); replace it\n")
    assert from_loader_worker(wrapped) == "cannot read image a.png (truncated); replace it"
    assert from_loader_worker("plain message") == "plain message"

    from trainer.cli.app import _fail

    class Captured(io.StringIO):
        pass

    err, old = Captured(), sys.stderr
    sys.stderr = err
    try:
        _fail("x" * 100_000, 2, launched=False)
    finally:
        sys.stderr = old
    assert MAX_MESSAGE < len(err.getvalue()) < MAX_MESSAGE + 100


@pytest.mark.parametrize("value,needle", [
    (["resnet50"], r"arch is \['resnet50'\] \(a list\), not an architecture name"),
    ({"a": 1}, r"arch is \{'a': 1\} \(a dict\)"),
])
def test_a_checkpoint_arch_that_is_not_a_name_is_one_line(tmp_path, value, needle):
    from trainer.files.checkpoint import load_checkpoint

    src = make_small_checkpoint(tmp_path / "start.pth")
    torch.save({**torch.load(src, weights_only=True), "arch": value}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=needle):
        load_checkpoint(tmp_path / "bad.pth")


@pytest.mark.parametrize("cfg,needle", [
    ("1e999999", "holds the number 1e999999, which is not finite"),
    ("[64, NaN]", "holds the number NaN"),
    ("[" * 100_000 + "]" * 100_000, "nests deeper than 32 levels"),
])
def test_a_safetensors_header_that_would_crash_the_parser_is_one_line(tmp_path, cfg, needle):
    from safetensors.torch import save_file

    from trainer.files.checkpoint import load_checkpoint

    path = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(1)}, str(path),
              metadata={"arch": "resnet50", "num_classes": "10", "cfg": cfg})
    with pytest.raises(CheckpointError, match=needle):
        load_checkpoint(path)


def test_a_small_file_claiming_a_huge_torchvision_model_is_refused_cheaply(tmp_path):
    """RegNet cannot be built on the meta device; its shapes now come from a weightless build
    (before: a real 644M-parameter build, 3.2 GB, to refuse a file of other keys)."""
    from trainer.files.checkpoint import load_checkpoint

    src = make_small_checkpoint(tmp_path / "start.pth")
    torch.save({**torch.load(src, weights_only=True), "arch": "torchvision:regnet_y_128gf",
                "cfg": []}, tmp_path / "bad.pth")
    t0 = time.process_time()
    with pytest.raises(CheckpointError, match="cfg and state_dict disagree|does not match|"
                                              "holds another model's weights"):
        load_checkpoint(tmp_path / "bad.pth")
    assert time.process_time() - t0 < 20


@pytest.mark.slow  # builds a RegNet twice (~6 s)
def test_a_torchvision_model_that_cannot_be_built_on_meta_still_loads(tmp_path):
    """HEAD refused every RegNet checkpoint ('Cannot copy out of meta tensor')."""
    from trainer.files.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
    from trainer.models.build import fresh_model

    model = fresh_model("torchvision:regnet_x_400mf", 10, 1.0)
    save_checkpoint(tmp_path / "r.pth", make_checkpoint(model))
    assert load_checkpoint(tmp_path / "r.pth")["arch"] == "torchvision:regnet_x_400mf"


def test_a_zip_bomb_checkpoint_is_refused_before_it_is_unpacked(tmp_path):
    """Before: a 2 MB file of deflated zeros took 2.6 GB to load."""
    from trainer.files.safeload import safe_torch_load

    raw = io.BytesIO()
    torch.save({"w": torch.zeros(16 << 20)}, raw)  # 64 MB
    with zipfile.ZipFile(raw) as src, zipfile.ZipFile(tmp_path / "bomb.pth", "w",
                                                      zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            out.writestr(info.filename, src.read(info.filename))
    assert (tmp_path / "bomb.pth").stat().st_size < 1 << 20
    with pytest.raises(CheckpointError, match=r"would unpack to 67 MB from a 0\.\d MB file"):
        safe_torch_load(tmp_path / "bomb.pth")
    stored = tmp_path / "plain.pth"
    torch.save({"w": torch.zeros(16 << 20)}, stored)  # what torch.save writes: stored
    assert safe_torch_load(stored)["w"].numel() == 16 << 20


# ---------------------------------------------------------------- 3. the lock


_HOLDER = """
import sys, time
sys.path.insert(0, {repo!r})
from trainer.files.lock import BOTH, WRITER, OutputLock
lock = OutputLock({path!r}, "--output x").acquire({roles_arg})
{after}
print("held", flush=True)
time.sleep(120)
"""


def _holder(path: Path, roles: str, after: str = "") -> subprocess.Popen:
    """A process that takes ``roles`` of the lock at ``path`` and keeps them."""
    from tests.helpers import REPO

    roles_arg = {"BOTH": "BOTH", "WRITER": "(WRITER,)"}[roles]
    code = _HOLDER.format(repo=str(REPO), path=str(path), roles_arg=roles_arg, after=after)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


def test_the_lock_refuses_a_second_run_and_a_stale_one_never_blocks(tmp_path):
    from trainer.files.lock import BOTH, OutputLock

    path = tmp_path / "out" / "x.lock"
    holder = _holder(path, "BOTH")
    try:
        with pytest.raises(ConfigError, match=rf"--output x is in use by another slimtune run "
                                              rf"\(pid {holder.pid}\)"):
            OutputLock(path, "--output x").acquire(BOTH)
    finally:
        _stop(holder)  # SIGKILL: the file stays, the lock goes with the process
    assert path.read_text().strip() == str(holder.pid)
    with OutputLock(path, "--output x").acquire(BOTH):
        assert path.read_text().strip() == str(os.getpid())
    assert not path.exists()  # the last holder removes it


def test_a_launchers_job_keeps_the_output_locked_after_the_launcher_is_gone(tmp_path):
    """The launcher holds the run byte and hands the writer byte to rank 0: a new run (or a
    --resume) is refused while either lives, so also while a dead job's ranks still run."""
    from trainer.files.lock import BOTH, WRITER, OutputLock

    path = tmp_path / "x.lock"
    launcher = _holder(path, "BOTH", after="lock.hand_over(WRITER)")
    rank0 = _holder(path, "WRITER")
    try:
        with pytest.raises(ConfigError, match=rf"pid ({launcher.pid}|{rank0.pid})"):
            OutputLock(path, "--output x").acquire(BOTH)
        _stop(launcher)  # the launcher is killed; its rank 0 lives on
        with pytest.raises(ConfigError, match=rf"pid {rank0.pid}\)"):
            OutputLock(path, "--output x").acquire(BOTH)
        with pytest.raises(ConfigError, match=rf"pid {rank0.pid}\)"):
            OutputLock(path, "--output x").acquire((WRITER,))  # another job's rank 0
    finally:
        _stop(rank0)
    OutputLock(path, "--output x").acquire(BOTH).release()


def test_a_resume_while_the_old_jobs_rank_lives_is_refused(tmp_path):
    """Through the CLI: an orphaned rank 0 (the writer byte held, no launcher) still owns
    out/x.pth; `finetune --resume` there is refused in one line naming it."""
    make_shared(tmp_path)
    (tmp_path / "run").mkdir()
    orphan = _holder(tmp_path / "run" / "out" / "x.lock", "WRITER")
    try:
        result = run_cli(*finetune_args("--resume"), cwd=tmp_path / "run")
    finally:
        _stop(orphan)
    _one_line(result, f"--output out/x.pth is in use by another slimtune run (pid {orphan.pid})")
    assert sorted(p.name for p in (tmp_path / "run" / "out").iterdir()) == ["x.lock"]


@pytest.mark.slow  # two fine-tunes, one in a process (~15 s)
def test_two_runs_on_one_output_do_not_clobber_each_other(tmp_path):
    """Before: both exited 0, B's best checkpoint replaced A's and the CSV mixed their rows."""
    from trainer.files.checkpoint import load_checkpoint

    make_shared(tmp_path)
    folder = tmp_path / "run"
    folder.mkdir()
    a = start(finetune_args(epochs=2), folder, env(SLIMTUNE_TEST_STEP_SLEEP="0.3"),
              log=folder / "a.txt")
    try:
        wait_for(lambda: (folder / "out" / "x.lock").exists(), 120, "run A to lock its output")
        b = run_cli(*finetune_args("--lr", "0.01", "--overwrite", epochs=2), cwd=folder)
        assert a.wait(timeout=240) == 0, (folder / "a.txt").read_text()[-2000:]
    finally:
        if a.poll() is None:
            a.kill()
    _one_line(b, "--output out/x.pth is in use by another slimtune run", f"(pid {a.pid})")
    assert load_checkpoint(folder / "out" / "x.pth")["config"]["lr"] == 0.003  # A's
    rows = (folder / "out" / "x_metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and not (folder / "out" / "x.lock").exists()


# ---------------------------------------------------------------- 4, 5. nothing clobbered


def _earlier_results(out: Path) -> dict[str, bytes]:
    """A finished 1-epoch run's files, written by hand; returns their bytes."""
    out.mkdir(parents=True)
    make_small_checkpoint(out / "x.pth", history={"epoch": [1]})
    torch.save({"kind": "resume", "epoch": 1, "finished": True, "best_acc": 30.0,
                "best_epoch": 1, "config": {"epochs": 1}}, out / "x.last.pth")
    (out / "x_metrics.csv").write_text("epoch,lr,train_loss,train_acc,test_loss,test_acc\n"
                                       "1,0.001,2.0,20.0,1.9,30.0\n")
    return {p.name: p.read_bytes() for p in out.iterdir()}


def _imagefolder_with_a_truncated_image(root: Path) -> Path:
    write_imagefolder(root / "images", classes=10, per_class=2)
    truncate_file(root / "images" / "train" / "class3" / "img1.png", 0.5)
    return root / "images"


IMAGES = ["--dataset", "imagefolder", "--data-dir", "images", "--epochs", "1", *FAST]


def test_a_run_that_fails_in_its_first_epoch_changes_no_file(tmp_path):
    """Before: the CSV was cut to its header at the start; a fresh run that failed left a
    header-only CSV and empty folders."""
    make_small_checkpoint(tmp_path / "start.pth")
    _imagefolder_with_a_truncated_image(tmp_path)
    result = run_cli("finetune", "--checkpoint", "start.pth", *IMAGES, "--output", "new/x.pth",
                     "--plot", "figs/x.png", cwd=tmp_path)
    _one_line(result, "cannot read image images/train/class3/img1.png")
    assert not (tmp_path / "new").exists() and not (tmp_path / "figs").exists()
    before = _earlier_results(tmp_path / "out")
    result = run_cli("finetune", "--checkpoint", "start.pth", *IMAGES, "--output", "out/x.pth",
                     "--overwrite", cwd=tmp_path)
    _one_line(result, "cannot read image images/train/class3/img1.png")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


@pytest.mark.slow  # three short fine-tunes (~10 s)
def test_overwrite_replaces_a_finished_run_and_resume_says_it_is_finished(tmp_path):
    from trainer.files.checkpoint import load_checkpoint

    make_shared(tmp_path)
    folder = tmp_path / "run"
    folder.mkdir()
    assert run_cli(*finetune_args(epochs=1), cwd=folder).returncode == 0
    again = run_cli(*finetune_args(epochs=1), cwd=folder)
    _one_line(again, "out/x.pth holds a finished run (1 of 1 epochs", "--overwrite")
    resumed = run_cli(*finetune_args("--resume", epochs=1), cwd=folder)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "x.pth is finished: all 1 epochs were trained" in resumed.stdout
    assert "resuming" not in resumed.stdout and "epoch 1/1" not in resumed.stdout
    replaced = run_cli(*finetune_args("--overwrite", "--lr", "0.01", epochs=1), cwd=folder)
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert load_checkpoint(folder / "out" / "x.pth")["config"]["lr"] == 0.01


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated in torch 2.9+
def test_what_is_a_checkpoint_is_found_by_content(tmp_path):
    from safetensors.torch import save_file

    from trainer.files.atomic import checkpoint_kind

    torch.save({"a": torch.zeros(2)}, tmp_path / "zip.png")
    torch.save({"a": torch.zeros(2)}, tmp_path / "legacy.yaml",
               _use_new_zipfile_serialization=False)
    save_file({"a": torch.zeros(2)}, str(tmp_path / "w.onnx"))
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "m.torchscript.pt"))
    (tmp_path / "f.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 100)
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("readme.txt", "hi")
    assert checkpoint_kind(tmp_path / "zip.png") == "a torch checkpoint"
    assert checkpoint_kind(tmp_path / "legacy.yaml") == "a torch checkpoint"
    assert checkpoint_kind(tmp_path / "w.onnx") == "a safetensors checkpoint"
    for name in ("m.torchscript.pt", "f.png", "other.zip", "missing"):
        assert checkpoint_kind(tmp_path / name) is None, name


def test_a_pipeline_workdir_with_dotdot_makes_no_stray_folder(tmp_path, monkeypatch):
    """Before: `pipeline --workdir x/../../w` left an empty x/."""
    from trainer.files.atomic import make_folder, remove_empty_made

    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    made = make_folder("x/../../w/checkpoints")
    assert made == tmp_path / "w" / "checkpoints"
    assert not (tmp_path / "here" / "x").exists()
    remove_empty_made()  # a run that failed: the folders it made and left empty go
    assert not (tmp_path / "w").exists()


def test_a_failed_download_leaves_no_folder(tmp_path, monkeypatch):
    import torchvision

    from trainer.data.datasets import build_datasets
    from trainer.errors import DataError

    def offline(url, root, **kwargs):
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / kwargs["filename"]).write_bytes(b"partial")
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    with pytest.raises(DataError, match="could not be downloaded"):
        build_datasets("cifar10", str(tmp_path / "a" / "data"), download=True)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- 6. no orphans


def _children(pid: int) -> list[int]:
    return [p for p in descendants(pid)
            if int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


@pytest.mark.slow  # a 2-process job (~30 s)
@pytest.mark.parametrize("also_the_launcher", [False, True], ids=["middle", "middle+launcher"])
def test_killing_the_jobs_middle_process_leaves_no_rank(tmp_path, also_the_launcher):
    """Before: with `accelerate launch` SIGKILLed, both ranks trained to the end, reparented,
    still writing the outputs, and the launcher took 12 s to notice. Now the kernel SIGTERMs
    each rank (PR_SET_PDEATHSIG) and the launcher ends what is left; with the launcher killed
    too, the ranks' own request alone must do."""
    make_shared(tmp_path)
    folder = tmp_path / "run"
    folder.mkdir()
    log = folder / "log.txt"
    proc = start(finetune_args("--gpus", "2", epochs=20), folder,
                 env(SLIMTUNE_TEST_STEP_SLEEP="0.3"), log=log)
    ranks: dict[int, int] = {}
    try:
        wait_for(lambda: (folder / "out" / "x.last.pth").exists(), 180, "the end of epoch 1")
        ranks = rank_pids(proc)
        middle = _children(proc.pid)
        assert sorted(ranks) == [0, 1] and len(middle) == 1
        killed = time.monotonic()
        os.kill(middle[0], signal.SIGKILL)
        if also_the_launcher:
            os.kill(proc.pid, signal.SIGKILL)
        code = proc.wait(timeout=60)
        left = max(0.0, 10 - (time.monotonic() - killed))
        time.sleep(left)
        alive = [r for r, pid in ranks.items() if _alive(pid)]
    finally:
        for pid in [*ranks.values(), *descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
    assert alive == [], f"ranks {alive} alive 10 s after the kill"
    if not also_the_launcher:
        assert code == 128 + signal.SIGKILL
        last = log.read_text().strip().splitlines()[-1]
        assert last.startswith("error: the job's accelerate launch process ended (killed by "
                               "SIGKILL) while its ranks ran"), log.read_text()[-2000:]
    assert not (folder / "out" / "x.lock").exists() or also_the_launcher


@pytest.mark.slow  # a 2-process job (~30 s)
def test_a_bad_image_inside_a_two_process_run_is_one_line(tmp_path):
    """Before: 121 lines, and torchrun's 'Root Cause' named the wrong rank."""
    make_small_checkpoint(tmp_path / "start.pth")
    _imagefolder_with_a_truncated_image(tmp_path)
    result = run_cli("finetune", "--checkpoint", "start.pth", *IMAGES, "--output", "out/x.pth",
                     "--gpus", "2", "--num-workers", "1", cwd=tmp_path, process=True,
                     timeout=240)
    _one_line(result, "cannot read image images/train/class3/img1.png (")
    assert not (tmp_path / "out" / "x_metrics.csv").exists()
    assert not (tmp_path / "out" / "x.lock").exists()


@pytest.mark.slow  # a 2-process job (~30 s)
def test_a_rank_killed_without_a_word_is_a_few_lines(tmp_path):
    """Before: 108 lines (the survivor's traceback, torchrun's log and report) before the
    right last line."""
    make_shared(tmp_path)
    folder = tmp_path / "run"
    folder.mkdir()
    result = run_cli(*finetune_args("--gpus", "2"), cwd=folder, timeout=240,
                     env=env(SLIMTUNE_TEST_KILL_AT="1:2:1"))
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines[-1].startswith("error: rank 1 died without reporting an error"), lines
    assert len(lines) <= 3, lines


# ---------------------------------------------------------------- 7. links and signals


def test_an_image_folder_link_loop_is_skipped_and_each_image_counted_once(tmp_path):
    """Before: one loop made 1,968 training images of 48 (1,936 labelled with its class); two
    made memory grow without bound."""
    from trainer.data.datasets import build_datasets

    write_imagefolder(tmp_path / "img", classes=3, per_class=16)
    train = tmp_path / "img" / "train"
    (train / "class1" / "loop").symlink_to("..")
    (train / "class2" / "loop2").symlink_to("..")
    (train / "class0" / "up").symlink_to("../..")
    (train / "class0" / "same").symlink_to(".")
    (train / "class0" / "again.png").symlink_to("img0.png")  # one image, two names
    (train / "class0" / "theirs").symlink_to("../class2")  # another class's images
    t0 = time.monotonic()
    data = build_datasets("imagefolder", str(tmp_path / "img"), image_size=16)
    assert time.monotonic() - t0 < 30
    assert len(data.train) == 48 and sorted(set(data.train.targets)) == [0, 1, 2]
    assert [data.train.targets.count(k) for k in range(3)] == [16, 16, 16]
    assert len(data.notes) == 2
    assert data.notes[0].startswith("skipped 4 link(s) that loop back into their own folder")
    assert data.notes[1].startswith("skipped 1 link(s) into another class's folder")


def test_a_stop_outside_the_loop_is_at_once_and_a_second_ctrl_c_is_hard():
    from trainer.train.loop import StopFlag

    flag = StopFlag()
    try:
        with pytest.raises(StopRequested, match="stopped by SIGTERM outside the training loop"):
            flag._handle(signal.SIGTERM, None)
        flag.signum = None
        with flag.in_loop():
            flag._handle(signal.SIGINT, None)  # in the loop: waits for the step boundary
            assert flag.signum == signal.SIGINT
            with pytest.raises(HardStop, match="stopped hard by a second Ctrl-C"):
                flag._handle(signal.SIGINT, None)
    finally:
        flag.restore()


def _catches_sigterm(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    caught = next(ln for ln in status.splitlines() if ln.startswith("SigCgt:")).split()[1]
    return bool(int(caught, 16) & (1 << (signal.SIGTERM - 1)))


@pytest.mark.slow  # a process (~10 s)
def test_sigterm_while_the_data_is_made_stops_within_seconds(tmp_path):
    """Before: 53 s from SIGTERM to exit while a 400,000-image synthetic set was made."""
    proc = start(["train", "--dataset", "synthetic", "--synthetic-train", "400000", "--cpu",
                  "--epochs", "1", "--output", "out/x.pth", "--num-workers", "0"], tmp_path)
    try:
        wait_for(lambda: proc.poll() is not None or _catches_sigterm(proc.pid), 120,
                 "the stop handler")
        time.sleep(1.5)  # into the data
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, output[-2000:]
    assert took < 10, f"{took:.1f} s to stop"
    assert "stopped by SIGTERM outside the training loop, no epoch was trained" in output
    assert list(tmp_path.iterdir()) == []


def _delivered(pid: int, signum: int) -> bool:
    """Whether the kernel no longer holds ``signum`` pending for ``pid`` (or it has ended)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    pending = [int(line.split()[1], 16) for line in status.splitlines()
               if line.startswith(("SigPnd:", "ShdPnd:"))]
    return not any(mask & (1 << (signum - 1)) for mask in pending)


@pytest.mark.slow  # a short fine-tune in a process (~15 s)
def test_a_second_ctrl_c_stops_hard_in_one_line(tmp_path):
    make_shared(tmp_path)
    folder = tmp_path / "run"
    folder.mkdir()
    proc = start(finetune_args(epochs=5), folder, env(SLIMTUNE_TEST_STEP_SLEEP="1"))
    try:
        wait_for(lambda: (folder / "out" / "x.last.pth").exists(), 180, "the end of epoch 1")
        proc.send_signal(signal.SIGINT)
        # On a loaded machine a second SIGINT sent while the first is still pending is merged
        # into it by the kernel: send it once the first has been delivered.
        wait_for(lambda: _delivered(proc.pid, signal.SIGINT), 30, "the first SIGINT delivered")
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output[-2000:]
    stops = [ln for ln in output.splitlines() if "stopped hard" in ln]
    assert stops == [HardStop.MESSAGE] and "Traceback" not in output, output[-2000:]
    assert not (folder / "out" / "x.lock").exists()


# ---------------------------------------------------------------- 8, 9. one line, not a crash


def test_out_of_memory_while_timing_names_the_batch(monkeypatch):
    from trainer.measure import profiling
    from trainer.models.build import fresh_model

    def oom(model, device):
        def run(x):
            if len(x) > 1:
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                                   "allocate 12582912000 bytes. Error code 12")
        return run

    monkeypatch.setattr(profiling, "_torch_runner", oom)
    model = fresh_model("vgg11", 10, 0.5)
    with pytest.raises(UserError, match=r"--batch-sizes 64: out of memory timing a batch of 64 "
                                        r"images of 3×32×32 on cpu \(DefaultCPUAllocator"):
        profiling.measure_latencies({"m": model}, "cpu", 32, batches=(1, 64), warmup=1,
                                    repeats=1)


@pytest.mark.slow  # a process under a memory cap (~8 s)
def test_a_latency_batch_beyond_a_memory_cap_is_one_line(tmp_path):
    """Before: a traceback (DefaultCPUAllocator) under a memory cap."""
    import resource

    make_small_checkpoint(tmp_path / "start.pth")

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (12 << 30, 12 << 30))

    result = subprocess.run([sys.executable, "-m", "launch", "profile", "start.pth", "--latency",
                             "--device", "cpu", "--batch-sizes", "1,1000000"], cwd=tmp_path,
                            env=cli_env(), capture_output=True, text=True, timeout=120,
                            preexec_fn=cap)
    _one_line(result, "--batch-sizes 1000000: ", "(out of memory)")


def test_floors_that_keep_every_channel_are_refused(tmp_path):
    make_small_checkpoint(tmp_path / "start.pth")
    base = ["prune", "--checkpoint", "start.pth", "--ratio", "0.5", "--no-eval", "--cpu",
            "--output", "p.pth"]
    _one_line(run_cli(*base, "--round-to", "100000", cwd=tmp_path),
              "--round-to 100000 keeps every channel: the widest pruned layer of this resnet50")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["start.pth"]

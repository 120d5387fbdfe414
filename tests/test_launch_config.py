"""Accelerate configs, launch command lines and the launcher's decisions (CPU only).

The real launches start ``accelerate launch`` with 2 gloo processes on the CPU (one machine,
and two simulated machines on 127.0.0.1) and check that each process saw world size 2.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import typing
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

import trainer.config.threads as threads_mod
from launch import plan as planning
from launch import supervise, user_config
from launch.accelerate_config import (
    build_accelerate_config,
    build_launch_argv,
    dump_yaml,
    launch_env,
    parse_gpu_ids,
    threads_per_process,
    worker_argv,
    write_config,
)
from launch.configcmd import (
    CONFIG_DIR,
    EXAMPLE_CONFIGS,
    default_config_name,
    write_named_config,
)
from tests.helpers import cli_text, communicate_all
from trainer.config.commands import accepted
from trainer.config.derived import worker_fields
from trainer.config.settings import RunConfig
from trainer.errors import ConfigError, ParamError, UserError

ROOT = Path(__file__).resolve().parent.parent
PROBE = ROOT / "tests" / "_dist_probe.py"
ODD_DIR = "dir with space 'single' \"double\" $HOME"


def load_back(config: dict, tmp_path: Path, name: str = "cfg.yaml"):
    """Write ``config`` and parse it with Accelerate's own loader."""
    return load_config_from_file(str(write_config(config, tmp_path / name)))


# ------------------------------------------------------------------ config dicts + YAML


def test_single_gpu_config_loads_in_accelerate(tmp_path):
    loaded = load_back(build_accelerate_config(gpus=1), tmp_path)
    assert loaded.distributed_type == DistributedType.NO
    assert loaded.num_processes == 1 and loaded.gpu_ids == "all"
    assert loaded.use_cpu is False and loaded.num_machines == 1


def test_dp_over_four_gpus_is_one_process_listing_the_gpus(tmp_path):
    loaded = load_back(build_accelerate_config(gpus=4, mode="dp"), tmp_path)
    assert loaded.distributed_type == DistributedType.NO
    assert loaded.num_processes == 1
    assert loaded.gpu_ids == "0,1,2,3"


def test_ddp_over_four_gpus(tmp_path):
    loaded = load_back(build_accelerate_config(gpus=4), tmp_path)
    assert loaded.distributed_type == DistributedType.MULTI_GPU
    assert loaded.num_processes == 4 and loaded.gpu_ids == "all"
    assert loaded.main_process_ip is None  # single machine: torchrun picks the address


def test_ddp_over_two_of_four_gpus(tmp_path):
    loaded = load_back(build_accelerate_config(gpus=2, gpu_ids=[0, 2]), tmp_path)
    assert loaded.distributed_type == DistributedType.MULTI_GPU
    assert loaded.num_processes == 2 and loaded.gpu_ids == "0,2"


def test_two_machines_count_processes_over_all_machines(tmp_path):
    config = build_accelerate_config(gpus=4, num_machines=2, machine_rank=1,
                                     main_process_ip="10.0.0.1", main_process_port=29400)
    loaded = load_back(config, tmp_path)
    assert loaded.distributed_type == DistributedType.MULTI_GPU
    assert loaded.num_processes == 8 and loaded.num_machines == 2
    assert loaded.machine_rank == 1
    assert loaded.main_process_ip == "10.0.0.1" and loaded.main_process_port == 29400
    assert loaded.same_network is True and loaded.rdzv_backend == "static"


def test_cpu_ddp_is_multi_gpu_with_use_cpu_and_the_env_flag(tmp_path):
    config = build_accelerate_config(gpus=2, cpu=True)
    loaded = load_back(config, tmp_path)
    assert loaded.distributed_type == DistributedType.MULTI_GPU
    assert loaded.num_processes == 2 and loaded.use_cpu is True
    assert loaded.gpu_ids is None  # no GPU list on CPU
    assert launch_env(config, cpu=True) == {"ACCELERATE_USE_CPU": "true"}
    assert launch_env(build_accelerate_config(gpus=2), cpu=False) == {}


def test_mixed_precision_no_survives_as_a_string(tmp_path):
    config = build_accelerate_config(gpus=2)
    text = dump_yaml(config)
    assert "mixed_precision: 'no'" in text
    assert "distributed_type: 'NO'" in dump_yaml(build_accelerate_config(gpus=1))
    assert load_back(config, tmp_path).mixed_precision == "no"
    assert load_back(build_accelerate_config(gpus=2, mixed_precision="bf16"),
                     tmp_path).mixed_precision == "bf16"


def test_write_config_is_atomic_and_creates_folders(tmp_path):
    target = tmp_path / ODD_DIR / "sub" / "a.yaml"
    write_config(build_accelerate_config(gpus=1), target, header="line one\nline two")
    text = target.read_text()
    assert text.startswith("# line one\n# line two\n")
    assert [p.name for p in target.parent.iterdir()] == ["a.yaml"]  # no temp file left
    assert load_config_from_file(str(target)).num_processes == 1


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("kwargs, needle", [
    ({"gpus": 0}, "--gpus 0:"),
    ({"gpus": -2}, "--gpus -2:"),
    ({"gpus": 2, "mode": "fsdp"}, "--mode 'fsdp' is unknown; use --mode ddp or --mode dp"),
    ({"gpus": 2, "num_machines": 0}, "--num-machines 0"),
    ({"gpus": 2, "num_machines": 2, "machine_rank": 2, "main_process_ip": "h"},
     "--machine-rank 2 is out of range"),
    ({"gpus": 2, "num_machines": 2}, "add --main-process-ip"),
    ({"gpus": 2, "num_machines": 2, "main_process_ip": "h", "main_process_port": 0},
     "--main-process-port 0"),
    ({"gpus": 2, "gpu_ids": [0, 0]}, "names a GPU twice"),
    ({"gpus": 3, "gpu_ids": [0, 2]}, "lists 2 GPUs but --gpus is 3"),
    ({"gpus": 1, "gpu_ids": [-1]}, "not a GPU number"),
    ({"gpus": 2, "mixed_precision": "fp8"}, "--mixed-precision 'fp8' is unknown"),
    ({"gpus": 2, "mode": "dp", "cpu": True}, "--mode dp"),
    ({"gpus": 2, "mode": "dp", "num_machines": 2, "main_process_ip": "h"}, "one machine"),
    ({"gpus": 2, "cpu": True, "gpu_ids": [0, 1]}, "--gpu-ids has no meaning with --cpu"),
])
def test_bad_settings_raise_one_line_config_errors(kwargs, needle):
    with pytest.raises(ConfigError) as err:
        build_accelerate_config(**kwargs)
    message = str(err.value)
    assert needle in message and "\n" not in message
    assert ";" in message  # problem; fix


@pytest.mark.parametrize("text, expected", [
    (None, None), ("", None), ("0,2", [0, 2]), (" 1 , 3 ", [1, 3]), ("5", [5]),
])
def test_parse_gpu_ids(text, expected):
    assert parse_gpu_ids(text) == expected


@pytest.mark.parametrize("text", ["a,b", "0;1", "0,,1", "-1", "1.5"])
def test_parse_gpu_ids_rejects_non_numbers(text):
    with pytest.raises(ConfigError, match="--gpu-ids .* e.g. --gpu-ids 0,2"):
        parse_gpu_ids(text)


# ------------------------------------------------------------------ argv


@pytest.mark.parametrize("kwargs", [{"gpus": 1}, {"gpus": 4, "mode": "dp"}, {"gpus": 4},
                                    {"gpus": 2, "cpu": True}])
def test_launch_argv_keeps_every_value_one_item(kwargs, tmp_path):
    path = tmp_path / ODD_DIR / "acc cfg.yaml"
    write_config(build_accelerate_config(**kwargs), path)
    args = ["--data-dir", ODD_DIR, "--output", "a 'b'.pth", "--cpu"]
    argv = build_launch_argv(path, "finetune", args, threads=3, python="/opt/py thon/python")
    assert argv[:5] == ["/opt/py thon/python", "-m", "accelerate.commands.launch",
                        "--config_file", str(path)]
    assert argv[5:] == ["--num_cpu_threads_per_process", "3", "-m", "trainer", "finetune", *args]
    assert shlex.split(shlex.join(argv)) == argv  # what --dry-run prints runs the same


@pytest.mark.parametrize("kwargs, port", [
    ({"gpus": 2, "cpu": True}, True), ({"gpus": 4}, True),
    ({"gpus": 1}, False), ({"gpus": 4, "mode": "dp"}, False),  # one process: no rendezvous
    ({"gpus": 2, "num_machines": 2, "main_process_ip": "10.0.0.1"}, False)])  # the user's port
def test_a_one_machine_ddp_job_gets_a_free_port_of_its_own(kwargs, port):
    config = build_accelerate_config(**kwargs)
    assert planning.needs_own_port(config) == port
    # A user's config that names a port keeps it.
    assert not planning.needs_own_port({**config, "main_process_port": 29600})
    argv = build_launch_argv("c.yaml", "finetune", ["--cpu"], threads=1)
    assert planning.with_port(argv, 41234) == argv[:5] + ["--main_process_port", "41234"] + \
        argv[5:]


@pytest.mark.parametrize("environ, kwargs, local", [
    ({}, {"gpus": 2, "cpu": True}, 2), ({}, {"gpus": 4}, 4), ({}, {"gpus": 1}, 1),
    ({}, {"gpus": 4, "mode": "dp"}, 1),  # DataParallel: one process
    ({}, {"gpus": 2, "num_machines": 3, "main_process_ip": "h"}, 2),  # per machine
    ({"OMP_NUM_THREADS": "3"}, {"gpus": 2, "cpu": True}, None),  # the user's choice wins
])
def test_every_launch_passes_the_cpu_threads_per_process(environ, kwargs, local, monkeypatch):
    """Accelerate's own default put 2 threads on each of 2 CPU processes of a 2-core machine
    and printed its "values were not passed" block; the launcher passes the value itself: the
    free cores (here an idle 8-core machine) over this machine's processes."""
    monkeypatch.setattr(threads_mod, "cores", lambda: 8)
    monkeypatch.setattr(threads_mod, "busy_cores", lambda: 0.0)
    config = build_accelerate_config(**kwargs)
    expected = 3 if local is None else 8 // local
    assert threads_per_process(config, environ) == expected
    assert threads_per_process(config, environ, given=5) == 5  # --threads wins over all
    p = plan(4, environ, cpu=kwargs.get("cpu", False), gpus=2, batch_size=64)
    argv = p.argv
    assert argv[argv.index("--num_cpu_threads_per_process") + 1] == \
        str(threads_per_process(p.config, environ))


@pytest.mark.parametrize("total, busy, processes, expected", [
    (2, 0.0, 1, 2),   # idle: every core, as torch's default (no slower than before)
    (2, 1.0, 1, 1),   # one busy neighbour: 1 thread (2 ran 3x slower than 1 there)
    (2, 0.4, 1, 2),   # a process that mostly sleeps is not a busy core
    (2, 5.7, 1, 1),   # overloaded: never fewer than one thread
    (16, 3.2, 2, 6),  # 13 free cores over 2 processes
    (16, 0.0, 64, 1),
])
def test_threads_come_from_the_cores_free_at_start(total, busy, processes, expected):
    choice = threads_mod.choose_threads(processes, environ={}, total=total, busy=busy)
    assert choice.count == expected
    assert f"of {total} cores free, {busy:.1f} busy at start" in str(choice)
    assert threads_mod.choose_threads(processes, given=3, environ={"OMP_NUM_THREADS": "7"},
                                      total=total, busy=busy).count == 3
    assert threads_mod.choose_threads(processes, environ={"OMP_NUM_THREADS": "7"},
                                      total=total, busy=busy).count == 7


def test_free_port_can_be_listened_on():
    port = planning.free_port()
    with socket.socket() as sock:
        sock.bind(("", port))
        sock.listen()
    assert 1024 <= port <= 65535


def _parse_worker_argv(argv: list[str]) -> RunConfig:
    """Minimal reading of the worker convention, typed by RunConfig's annotations."""
    hints = typing.get_type_hints(RunConfig)
    values: dict[str, typing.Any] = {"command": argv[0]}
    i = 1
    while i < len(argv):
        name = argv[i][2:].replace("-", "_")
        if hints.get(name) is bool:
            values[name] = True
        elif name.startswith("no_") and hints.get(name[3:]) is bool:
            values[name[3:]] = False
        else:
            kind = hints[name]
            raw = argv[i + 1]
            i += 1
            if name == "ratios":
                values[name] = tuple(float(r) for r in raw.split(","))
            elif kind == tuple[str, ...]:  # criteria, allocations: comma-separated names
                values[name] = tuple(raw.split(","))
            else:
                base = next((t for t in (int, float, str) if t in typing.get_args(kind) or
                             t is kind), str)
                values[name] = base(raw)
        i += 1
    return RunConfig(**values)


def test_worker_argv_roundtrips_every_worker_field():
    cfg = RunConfig(command="pipeline", data_dir=ODD_DIR, download=False, limit_batches=None,
                    checkpoint="a b.pth", ratios=(0.3, 0.7), lr=1e-5, eval=True, cpu=True,
                    seed=7, warmup_epochs=0.5, log_with=None, gpus=3, dry_run=True)
    argv = worker_argv(cfg)
    assert argv[0] == "pipeline"
    assert "--no-download" in argv and "--eval" in argv and "--cpu" in argv
    assert "--limit-batches" not in argv and "--log-with" not in argv  # None: omitted
    assert argv[argv.index("--ratios") + 1] == "0.3,0.7"
    assert argv[argv.index("--data-dir") + 1] == ODD_DIR
    for launcher_only in ("--gpus", "--dry-run", "--num-processes", "--main-process-port"):
        assert launcher_only not in argv
    back = _parse_worker_argv(argv)
    for f in worker_fields():
        assert getattr(back, f.name) == getattr(cfg, f.name), f.name
    assert worker_argv(cfg) == argv  # deterministic


def test_worker_argv_follows_field_order_and_can_be_restricted():
    cfg = RunConfig(command="evaluate", checkpoint="m.pth", json=True)
    names = [a[2:] for a in worker_argv(cfg) if a.startswith("--")]
    order = [f.name.replace("_", "-") for f in worker_fields()]
    plain = [n[3:] if n.startswith("no-") and n[3:] in order else n for n in names]
    assert plain == sorted(plain, key=order.index)
    argv = worker_argv(cfg, options={"batch_size", "json"}, positional=("checkpoint",))
    assert argv == ["evaluate", "m.pth", "--batch-size", "100", "--json"]


@pytest.mark.parametrize("command", ["train", "prune", "finetune", "evaluate", "pipeline"])
def test_worker_argv_is_accepted_by_the_real_worker_cli(command):
    from trainer.cli.app import build_app, run_app

    options, positional = accepted(command)
    cfg = RunConfig(command=command, checkpoint="in put.pth", data_dir=ODD_DIR, download=False,
                    epochs=3, batch_size=48, lr=0.05, ratio=0.4, ratios=(0.25, 0.75), seed=5,
                    cpu=True, mode="dp", channels_last=False, limit_batches=2, json=True)
    seen: list[RunConfig] = []
    app = build_app(lambda c: seen.append(c) or 0)
    code = run_app(app, worker_argv(cfg, options, positional))
    assert code == 0 and len(seen) == 1
    for name in set(options) | set(positional):
        if name in {f.name for f in worker_fields()}:
            assert getattr(seen[0], name) == getattr(cfg, name), name


# ------------------------------------------------------------------ committed examples


def test_examples_regenerate_identically_and_load(tmp_path):
    committed = {p.name for p in (ROOT / CONFIG_DIR).glob("*.yaml")}
    assert committed == {name for name, _ in EXAMPLE_CONFIGS}
    for name, kwargs in EXAMPLE_CONFIGS:
        assert default_config_name(**kwargs) == name
        fresh = write_named_config(kwargs, tmp_path / name)
        assert fresh.read_text() == (ROOT / CONFIG_DIR / name).read_text(), name
        loaded = load_config_from_file(str(ROOT / CONFIG_DIR / name))
        assert loaded.num_processes == build_accelerate_config(**kwargs)["num_processes"]


def test_default_config_names():
    assert default_config_name(gpus=1, cpu=True) == "cpu_single.yaml"
    assert default_config_name(gpus=2, gpu_ids=[0, 2], mixed_precision="bf16") == \
        "ddp_2gpu_gpus0-2_bf16.yaml"
    assert default_config_name(gpus=1, num_machines=2, machine_rank=1, cpu=True) == \
        "cpu_ddp_2nodes_1proc_rank1.yaml"


def test_config_command_writes_and_prints_the_path(tmp_path, capsys):
    from launch.configcmd import config

    out = tmp_path / ODD_DIR / "x.yaml"
    assert config(gpus=None, mode="ddp", gpu_ids="0,2", mixed_precision="no", cpu=False,
                  num_machines=1, machine_rank=0, main_process_ip=None,
                  main_process_port=29500, output=out, examples=False) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert load_config_from_file(str(out)).gpu_ids == "0,2"
    assert out.read_text().startswith("# Accelerate config written by: python -m launch "
                                      "config --gpus 2 --gpu-ids 0,2\n")


# ------------------------------------------------------------------ launcher decisions


def plan(visible=4, environ=None, **fields):
    return planning.plan_launch(RunConfig(**fields), visible_gpus=visible, environ=environ or {})


@pytest.mark.parametrize("fields, visible", [
    ({"gpus": 1}, 4), ({"cpu": True}, 0), ({"cpu": True, "gpus": 1}, 8), ({}, 1),
    ({"gpu_ids": "0"}, 2), ({"debug": True, "gpus": 4}, 0), ({"mode": "dp", "gpus": 1}, 2),
])
def test_one_process_runs_in_process(fields, visible):
    p = plan(visible, **fields)
    assert p.in_process and p.argv == []


def test_no_gpu_and_no_request_runs_on_cpu_in_process():
    p = plan(0)
    assert p.in_process and p.run.cpu is True and "no CUDA GPU" in p.note


def test_default_uses_every_visible_gpu_with_ddp(tmp_path):
    p = plan(4, output=str(tmp_path / ODD_DIR / "m.pth"))
    assert not p.in_process and p.write
    assert p.config["num_processes"] == 4 and p.config["distributed_type"] == "MULTI_GPU"
    assert p.config_path == tmp_path / ODD_DIR / "accelerate_ddp_4proc.yaml"
    assert p.argv[p.argv.index("--config_file") + 1] == str(p.config_path)
    assert p.argv[7:10] == ["-m", "trainer", "finetune"]
    assert "--gpus" not in p.argv and p.env == {}


def test_the_config_goes_beside_the_default_output_too():
    """finetune without --output writes <checkpoint stem>_finetune.pth beside the checkpoint."""
    p = plan(2, checkpoint="sub/model_prune.pth", output=None)
    assert p.config_path == Path("sub/accelerate_ddp_2proc.yaml")
    p = plan(2, command="train", output=None, sparsity=1e-4)
    assert p.config_path == Path("checkpoints/accelerate_ddp_2proc.yaml")


def test_dp_over_several_gpus_is_a_launched_single_process():
    p = plan(4, mode="dp", gpus=3)
    assert not p.in_process and p.config["distributed_type"] == "NO"
    assert p.config["gpu_ids"] == "0,1,2" and p.config_path.name == "accelerate_dp_3gpu.yaml"


def test_cpu_ddp_plan_sets_the_cpu_env():
    p = plan(0, cpu=True, gpus=2, command="pipeline", workdir="w")
    assert p.config["use_cpu"] is True and p.config["num_processes"] == 2
    assert p.env == {"ACCELERATE_USE_CPU": "true"}
    assert p.config_path == Path("w/checkpoints/accelerate_cpu_ddp_2proc.yaml")


def test_gpu_ids_pick_devices_through_cuda_visible_devices():
    p = plan(4, gpu_ids="0,2")
    assert p.config["num_processes"] == 2 and p.config["gpu_ids"] == "0,2"
    p = plan(4, environ={"CUDA_VISIBLE_DEVICES": "4,5,6,7"}, gpu_ids="0,2")
    assert p.config["gpu_ids"] == "4,6"
    p = plan(4, gpu_ids="3")  # one process, but on GPU 3: launched to set the device
    assert not p.in_process and p.config["gpu_ids"] == "3"


def test_multi_node_plan_names_the_node(tmp_path):
    p = plan(0, cpu=True, num_machines=2, machine_rank=1, main_process_ip="127.0.0.1",
             output=str(tmp_path / "m.pth"))
    assert p.config["num_processes"] == 2 and p.config["machine_rank"] == 1
    assert p.config_path.name == "accelerate_cpu_ddp_2proc_node1.yaml"


@pytest.mark.parametrize("fields, visible, needle", [
    ({"gpus": 4}, 2, "--gpus 4 but only 2 GPUs are visible; use --gpus 2 or fewer"),
    ({"gpus": 2}, 0, "add --cpu"),
    ({"gpus": 1}, 0, "add --cpu"),
    ({"num_machines": 2, "main_process_ip": "h"}, 0, "add --cpu"),
    ({"gpu_ids": "0,5"}, 4, "--gpu-ids 0,5 but only 4 GPUs are visible"),
    ({"gpus": 8, "batch_size": 100}, 8, "--batch-size 100 does not split evenly over 8"),
    ({"cpu": True, "gpus": 3, "batch_size": 64}, 0, "use a multiple of 3 (e.g. --batch-size 63)"),
    ({"gpus": 0}, 4, "--gpus 0:"),
])
def test_launcher_refuses_what_the_machine_cannot_do(fields, visible, needle):
    with pytest.raises(UserError) as err:  # ConfigError, or a ParamError said in flags
        plan(visible, **fields)
    assert needle in cli_text(err.value) and "\n" not in cli_text(err.value)


def test_user_config_is_used_as_is(tmp_path):
    path = tmp_path / ODD_DIR / "mine.yaml"
    write_config(build_accelerate_config(gpus=2, cpu=True), path)
    p = plan(0, accelerate_config=str(path), batch_size=64, cpu=True)
    assert not p.write and p.config_path == path and p.config["num_processes"] == 2
    assert p.argv[p.argv.index("--config_file") + 1] == str(path)
    with pytest.raises(ParamError, match="does not split evenly over 2"):
        plan(0, accelerate_config=str(path), batch_size=65)
    with pytest.raises(ConfigError, match="drop --gpus/--gpu-ids"):
        plan(0, accelerate_config=str(path), gpus=2)


@pytest.mark.parametrize("content, needle", [
    (None, "cannot read --accelerate-config"),
    ("a: [1, 2\n", "is not valid YAML (line"),
    ("- 1\n- 2\n", "is not a mapping"),
    ("num_processes: 2\n", "has no distributed_type"),
    ("distributed_type: MULTI_GPU\n", "needs num_processes >= 1"),
    ("distributed_type: MULTI_GPU\nnum_processes: x\n", "needs num_processes >= 1"),
])
def test_bad_user_config_is_one_config_error(tmp_path, content, needle):
    path = tmp_path / "user.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as err:
        plan(0, accelerate_config=str(path))
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("line, needle", [
    ("distributed_type: FOO", "distributed_type 'FOO' is not supported; use 'NO' (one"),
    ("distributed_type: MULTI_CPU", "distributed_type 'MULTI_CPU' is not supported"),
    ("distributed_type: DEEPSPEED", "distributed_type 'DEEPSPEED' is not supported"),
    ("distributed_type: NO", "distributed_type: NO reads as false in YAML; quote it"),
    ("mixed_precision: fp8", "mixed_precision 'fp8' is not supported; use 'no', 'bf16', 'fp16'"),
    ("num_machines: abc", "num_machines 'abc' is not allowed; use a whole number >= 1"),
    ("num_machines: 0", "num_machines 0 is not allowed"),
    ("machine_rank: 1", "machine_rank 1 is not allowed for num_machines 1; use 0 .. 0"),
    ("machine_rank: x", "machine_rank 'x' is not allowed"),
    ("num_processes: 2.5", "needs num_processes >= 1"),
    ("num_processes: '2'", "needs num_processes >= 1"),
    ("num_processes: true", "needs num_processes >= 1"),
    ("use_cpu: 'yes'", "use_cpu 'yes' is not allowed; use true"),
    ("gpu_ids: 0,x", "gpu_ids '0,x' is not a list of GPU numbers"),
    ("gpu_ids: 0,0", "gpu_ids '0,0' names a GPU twice"),
    ("gpu_ids: 0,1,2", "gpu_ids 0,1,2 lists 3 GPUs for 2 processes per machine"),
    ("{num_machines: 2, main_process_ip: h, num_processes: 3}",
     "num_processes 3 does not split evenly over num_machines 2"),
    ("num_machines: 2", "num_machines 2 needs main_process_ip"),
    ("main_process_port: 70000", "main_process_port 70000 is not a TCP port"),
])
def test_bad_values_in_a_users_config_are_one_config_error(tmp_path, line, needle):
    """Accelerate turned these into a traceback (FOO, fp8, NO), the launcher crashed on them
    (num_machines abc) or the job quietly ran something else (MULTI_CPU: one process)."""
    config = build_accelerate_config(gpus=2, cpu=True)
    text = dump_yaml(config) + "\n".join(f"{k}: {json.dumps(v)}" for k, v in
                                          yaml.safe_load(line).items()) + "\n"
    if line.startswith("distributed_type: NO"):
        text = dump_yaml(config).replace("distributed_type: MULTI_GPU", line)
    path = tmp_path / "user.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        plan(0, accelerate_config=str(path), cpu=True)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert str(err.value).startswith(f"--accelerate-config {path}")


def test_every_example_config_passes_the_checks():
    for path in sorted((ROOT / "configs" / "accelerate").glob("*.yaml")):
        user_config.load_user_config(path)


@pytest.mark.parametrize("yaml_name, visible, needle", [
    ("ddp_2gpu.yaml", 0, "ddp_2gpu.yaml asks for 2 GPUs but no CUDA GPU is visible on this "
                         "machine; add --cpu to run on the CPU"),
    ("single_gpu.yaml", 0, "single_gpu.yaml asks for 1 GPU but no CUDA GPU is visible"),
    ("ddp_4gpu.yaml", 2, "ddp_4gpu.yaml starts 4 GPU processes on this machine but only 2 GPUs "
                         "are visible; use a config for 2 or fewer"),
    ("ddp_2nodes_4gpu_rank0.yaml", 3, "starts 4 GPU processes on this machine but only 3"),
    ("dp_4gpu.yaml", 2, "dp_4gpu.yaml uses gpu_ids 0,1,2,3 but only 2 GPUs are visible"),
])
def test_a_users_gpu_config_is_refused_where_the_gpus_are_not(yaml_name, visible, needle):
    """Before, ddp_2gpu.yaml on a GPU-less machine quietly ran ONE CPU process."""
    path = str(ROOT / "configs" / "accelerate" / yaml_name)
    with pytest.raises(ConfigError) as err:
        plan(visible, accelerate_config=path)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)
    for ok in ({"cpu": True}, {"dry_run": True}):  # on the CPU; a preview for another machine
        assert not plan(visible, accelerate_config=path, batch_size=64, **ok).in_process
    assert plan(8, accelerate_config=path, batch_size=64).config_path == Path(path)


def test_evaluate_argv_passes_the_checkpoint_as_argument():
    p = plan(0, command="evaluate", checkpoint="my ckpt.pth", cpu=True, gpus=2)
    tail = p.argv[p.argv.index("trainer") + 1:]
    assert tail[:2] == ["evaluate", "my ckpt.pth"]
    assert "--epochs" not in tail and "--checkpoint" not in tail


def test_missing_accelerate_is_a_config_error(monkeypatch):
    real = planning.importlib.util.find_spec
    monkeypatch.setattr(planning.importlib.util, "find_spec",
                        lambda name, *a: None if name == "accelerate" else real(name, *a))
    with pytest.raises(ConfigError, match="accelerate is not installed.*pip install accelerate"):
        plan(0, cpu=True, gpus=2)


def test_dry_run_prints_command_and_yaml_and_runs_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(supervise, "run_job", lambda *a: pytest.fail("dry run launched"))
    cfg = RunConfig(cpu=True, gpus=2, dry_run=True, output=str(tmp_path / ODD_DIR / "m.pth"))
    assert planning.dispatch(cfg) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert first.startswith("ACCELERATE_USE_CPU=true ")
    argv = shlex.split(first)[1:]
    assert argv[1:3] == ["-m", "accelerate.commands.launch"] and "--cpu" in argv
    assert out.splitlines()[1].startswith("# the launch adds --main_process_port <a free port>")
    assert "num_processes: 2" in out and "use_cpu: true" in out
    assert not (tmp_path / ODD_DIR).exists()  # config not written


def test_unwritable_config_folder_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setattr(supervise, "run_job", lambda *a: pytest.fail("launched anyway"))
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    # train on synthetic data: inputs the launcher's pre-flight finds usable
    cfg = RunConfig(command="train", dataset="synthetic", cpu=True, gpus=2,
                    output=str(blocker / "m.pth"))
    # the output lock beside it is made first (issue 21), so its folder is the one refused
    with pytest.raises(ConfigError, match="cannot write (the Accelerate config|to) .*; (pick|"
                                          "choose) a writable"):
        planning.dispatch(cfg)


def test_dispatch_runs_one_process_in_process(monkeypatch, capsys):
    import trainer.commands.worker

    seen = []
    monkeypatch.setattr(trainer.commands.worker, "run_worker", lambda cfg: seen.append(cfg) or 7)
    assert planning.dispatch(RunConfig(cpu=True, command="evaluate", checkpoint="c.pth")) == 7
    assert seen[0].command == "evaluate"
    assert planning.dispatch(RunConfig(cpu=True, dry_run=True)) == 0
    assert "runs in this process" in capsys.readouterr().out and len(seen) == 1


# ------------------------------------------------------------------ running jobs


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_run_job_reports_failed_ranks_last_and_their_exit_code(capsys):
    code = supervise.run_job(_python("""
        import os, sys, pathlib
        d = pathlib.Path(os.environ["SLIMTUNE_FAILURE_DIR"])
        (d / "rank3.txt").write_text("checkpoint x.pth is missing; pass --checkpoint\\n")
        (d / "rank1.txt").write_text("disk full; free space\\nexit_code=2\\n")
        print("worker noise", file=sys.stderr)
        sys.exit(1)
    """), dict(os.environ))
    assert code == 2
    last = capsys.readouterr().err.strip().splitlines()[-2:]
    assert last == ["error: rank 1 failed: disk full; free space",
                    "error: rank 3 failed: checkpoint x.pth is missing; pass --checkpoint"]


def test_run_job_without_failure_file_summarises_the_exit_code(capsys):
    assert supervise.run_job(_python("import sys; sys.exit(3)"), dict(os.environ)) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: the launched job failed with exit code 3")
    assert supervise.run_job(_python("pass"), dict(os.environ)) == 0


_TORCHRUN_FAILURE = """
    import os, sys, pathlib
    d = pathlib.Path(os.environ["SLIMTUNE_FAILURE_DIR"])
    for rank in (0, 1):
        (d / f"rank{rank}.txt").write_text("no data in d; pass --data-dir\\nexit_code=CODE\\n")
    print("worker noise", file=sys.stderr)
    print("W1128 14:35:52.044000 2153 torch/distributed/elastic/multiprocessing/api.py:1028] "
          "Sending process 2159 closing signal SIGTERM", file=sys.stderr)
    print("Traceback (most recent call last):\\n  File 'x', line 1, in <module>\\n"
          "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \\n"
          "=====\\ntrainer FAILED\\n=====", file=sys.stderr)
    sys.exit(1)
"""


@pytest.mark.parametrize("code", [2, 1])
def test_torchruns_report_is_held_back_when_every_rank_said_the_same(capsys, code):
    """Bad input that every rank reported (exit code 2) is one line; torchrun's traceback and
    log lines only repeat what the ranks reported, so any failure a rank reported shows the
    ranks' lines without them (issue 21: a killed rank printed 108 lines before its own)."""
    child = _python(_TORCHRUN_FAILURE.replace("CODE", str(code)))
    assert supervise.run_job(child, dict(os.environ), ranks=range(2)) == code
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "worker noise"  # the job's own output still comes through
    assert "closing signal SIGTERM" not in err and "ChildFailedError" not in err
    if code == 2:
        assert err.splitlines()[1:] == ["error: no data in d; pass --data-dir"]
    else:
        assert err.splitlines()[-1] == "error: rank 1 failed: no data in d; pass --data-dir"


def test_the_stderr_relay_keeps_progress_bars_and_drains_when_our_stderr_is_gone(
        capsys, monkeypatch):
    bar = _python('import sys; sys.stderr.write("10%\\r50%\\r100%\\n")')
    assert supervise.run_job(bar, dict(os.environ), ranks=range(1)) == 0
    assert capsys.readouterr().err == "10%\r50%\r100%\n"  # one line, redrawn in place
    gone = open(os.devnull, "w")
    gone.close()  # writing raises ValueError, like a closed terminal's EIO
    monkeypatch.setattr(sys, "stderr", gone)
    # 400 KB: far more than a pipe holds, so the job would block if nobody read on
    chatty = _python('import sys\nfor _ in range(4000): print("x" * 99, file=sys.stderr)')
    assert supervise.run_job(chatty, dict(os.environ), ranks=range(1)) == 0


def test_sigint_is_forwarded_to_the_job_and_its_code_returned(tmp_path):
    ready, got = tmp_path / "ready", tmp_path / "got"
    child = _python(f"""
        import signal, sys, time, pathlib
        def stop(signum, frame):
            pathlib.Path({str(got)!r}).write_text(str(signum))
            sys.exit(130)
        signal.signal(signal.SIGINT, stop)
        pathlib.Path({str(ready)!r}).write_text("1")
        time.sleep(30)
        sys.exit(0)
    """)

    def interrupt_when_ready():
        deadline = time.monotonic() + 20
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    timer = threading.Thread(target=interrupt_when_ready, daemon=True)
    timer.start()
    start = time.monotonic()
    code = supervise.run_job(child, dict(os.environ))
    assert code == 130 and got.read_text() == str(int(signal.SIGINT))
    assert time.monotonic() - start < 20
    assert signal.getsignal(signal.SIGINT) is before  # our forwarding handler is removed


def _probe_argv(config_path: Path, command: str, args: list[str]) -> list[str]:
    """The launch command with the probe script where the worker module would be."""
    argv = build_launch_argv(config_path, command, args, threads=1)
    at = argv.index("trainer") - 1  # "-m", "trainer"
    return [*argv[:at], str(PROBE), *argv[at + 2:]]


def _probe_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("SLIMTUNE_FAILURE_DIR", None)
    return env


def _records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


@pytest.mark.slow  # ~3 s alone, ~8 s on a busy 2-core machine
def test_two_cpu_processes_form_a_gloo_world_of_two(tmp_path):
    config = build_accelerate_config(gpus=2, cpu=True)
    path = write_config(config, tmp_path / ODD_DIR / "cpu ddp.yaml")
    out = tmp_path / ODD_DIR / "out"
    args = ["--data-dir", ODD_DIR, "--cpu", "--out", str(out)]
    argv = _probe_argv(path, "finetune", args)
    result = subprocess.run(argv, env=_probe_env() | launch_env(config, cpu=True), cwd=ROOT,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    records = _records(out)
    assert [r["rank"] for r in records] == [0, 1]
    for r in records:
        assert r["world_size"] == 2 and r["backend"] == "gloo"
        assert r["distributed_type"] == "MULTI_CPU" and r["sum"] == 3.0  # 1 + 2 all-reduced
        assert r["argv"] == ["finetune", *args]


@pytest.mark.slow  # ~3 s alone, ~8 s on a busy 2-core machine
def test_failed_rank_of_a_real_job_is_reported_with_its_code(tmp_path, capsys):
    config = build_accelerate_config(gpus=2, cpu=True)
    path = write_config(config, tmp_path / "c.yaml")
    argv = _probe_argv(path, "x", ["--fail", "--out", str(tmp_path / "o")])
    code = supervise.run_job(argv, _probe_env() | launch_env(config, cpu=True))
    assert code == 2  # torchrun itself exits 1; the rank's failure file carries the 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "error: rank 1 failed: bad thing happened"


@pytest.mark.slow  # ~3 s alone, ~8 s on a busy 2-core machine
def test_two_machines_on_loopback_form_a_world_of_two(tmp_path):
    port, out = planning.free_port(), tmp_path / "out"
    procs = []
    for rank in (0, 1):
        config = build_accelerate_config(gpus=1, cpu=True, num_machines=2, machine_rank=rank,
                                         main_process_ip="127.0.0.1", main_process_port=port)
        path = write_config(config, tmp_path / f"node{rank}.yaml")
        argv = _probe_argv(path, "x", ["--out", str(out)])
        procs.append(subprocess.Popen(argv, env=_probe_env() | launch_env(config, cpu=True),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [out for out, _ in communicate_all(procs, 120)]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-1500:] + outputs[1][-1500:]
    records = _records(out)
    assert [r["rank"] for r in records] == [0, 1]
    assert all(r["world_size"] == 2 and r["backend"] == "gloo" and r["sum"] == 3.0
               for r in records)


@pytest.mark.parametrize(("yaml_name", "mode", "precision"), [
    ("dp_4gpu.yaml", "dp", "no"), ("ddp_4gpu.yaml", "ddp", "no")])
def test_a_users_config_decides_mode_and_precision(yaml_name, mode, precision):
    """--accelerate-config dp_4gpu.yaml must wrap in DataParallel, whatever --mode defaults to."""
    p = plan(accelerate_config=str(ROOT / "configs" / "accelerate" / yaml_name))
    assert p.run.mode == mode and p.run.mixed_precision == precision
    argv = p.argv
    assert argv[argv.index("--mode") + 1] == mode


def test_mixed_precision_comes_from_the_users_yaml(tmp_path):
    config = build_accelerate_config(gpus=2)
    config["mixed_precision"] = "bf16"
    path = tmp_path / "bf16.yaml"
    path.write_text(yaml.safe_dump(config))
    p = plan(accelerate_config=str(path), mixed_precision="no")
    assert p.run.mixed_precision == "bf16"
    assert p.argv[p.argv.index("--mixed-precision") + 1] == "bf16"


def test_dry_run_previews_a_gpu_layout_on_a_machine_without_gpus():
    p = plan(visible=0, gpus=4, dry_run=True)
    assert p.config["num_processes"] == 4 and p.config["distributed_type"] == "MULTI_GPU"
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        plan(visible=0, gpus=4)


def test_a_users_gpu_ids_are_physical_under_a_narrowed_cuda_visible_devices(tmp_path):
    """Accelerate passes gpu_ids on as CUDA_VISIBLE_DEVICES: under CUDA_VISIBLE_DEVICES=2,3
    (a scheduler's share) a config for GPUs 2,3 is right, and one for 0,1 is someone else's."""
    path = tmp_path / "u.yaml"
    config = user_config.load_user_config(ROOT / "configs" / "accelerate" / "ddp_2gpu.yaml")
    for ids, ok in (("2,3", True), ("0,1", False)):
        path.write_text(yaml.safe_dump({**config, "gpu_ids": ids}))
        run = functools.partial(plan, 2, environ={"CUDA_VISIBLE_DEVICES": "2,3"},
                                accelerate_config=str(path), batch_size=64)
        if ok:
            assert run().config["gpu_ids"] == "2,3"
        else:
            with pytest.raises(ConfigError, match=r"gpu_ids 0,1 but CUDA_VISIBLE_DEVICES=2,3; "
                                                  r"list GPUs from it"):
                run()

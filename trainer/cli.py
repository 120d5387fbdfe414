"""The command-line app, built once and used twice.

``launch`` builds the user-facing app with ``dispatch`` = the launcher (it may start
``accelerate launch``); ``python -m trainer`` builds it with the in-process worker. Every
run option is declared once in ``OPTIONS``; its option name is the RunConfig field with
``_`` -> ``-`` (booleans as ``--x/--no-x``), which is what the launcher's argv relies on.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Annotated, Any

import typer

from trainer import dist
from trainer.config import RunConfig
from trainer.errors import UserError
from trainer.files import disk_full

Dispatch = Callable[[RunConfig], int]


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(Exit, usage error, Abort) classes that parsing a command line may raise.

    typer >= 0.26 raises from its own copy of click (``typer._click``, with ``typer.Exit`` and
    ``typer.Abort``), older typer from ``click`` itself; each may be absent, so every one
    found is caught.
    """
    exits, usage, aborts = [typer.Exit], [], [typer.Abort]
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        usage.append(mod.ClickException)
        exits.append(getattr(mod, "Exit", typer.Exit))  # typer._click has neither
        aborts.append(getattr(mod, "Abort", typer.Abort))
    return tuple(exits), tuple(usage), tuple(aborts)


_EXIT, _USAGE, _ABORT = _click_exceptions()

# field -> (type, help). Defaults come from RunConfig unless a command overrides them.
OPTIONS: dict[str, tuple[Any, str]] = {
    # data
    "dataset": (str, ("Dataset: cifar10, cifar100, imagefolder (--data-dir/train|val/<class>/*) "
                     "or synthetic (built in, offline).")),
    "data_dir": (str, "Folder holding (or receiving) the dataset files."),
    "download": (bool, "Download CIFAR into --data-dir when it is missing."),
    "image_size": (int, "Image side in pixels (imagefolder images are resized to it)."),
    "synthetic_train": (int, "Images in the synthetic train split."),
    "synthetic_test": (int, "Images in the synthetic test split."),
    "num_workers": (int, "DataLoader worker processes per rank (torch loader)."),
    "loader": (str, ("Training data loader: auto (gpu on CUDA, else torch), torch, or gpu "
                    "(whole dataset on the device, augmentation on the device).")),
    "limit_batches": (int | None, "Cap on training batches per epoch (smoke runs; default: "
                                  "the whole epoch)."),
    # files
    "checkpoint": (str | None, "Input checkpoint (.pth)."),
    "init": (str | None, "Start from this checkpoint's weights instead of from scratch "
                         "(default: from scratch)."),
    "output": (str | None, "Best checkpoint written here (default depends on the command)."),
    "plot": (str | None, "Curves figure (default plots/<output stem>.png)."),
    # optimisation
    "epochs": (int, "Epochs to run."),
    "batch_size": (int, "GLOBAL batch size: split across DDP processes, split across GPUs by DP."),
    "lr": (float, "Base learning rate (divided by 10 at 50% and 75% of the epochs)."),
    "optimizer": (str, "Optimizer: sgd (momentum) or adam."),
    "momentum": (float, "SGD momentum."),
    "weight_decay": (float, "Weight decay (L2)."),
    "warmup_epochs": (float, "Linear LR warm-up length in epochs (fractions allowed)."),
    "sparsity": (float, "L1 penalty λ on BatchNorm γ (network slimming uses 1e-4; 0 = off)."),
    # pruning
    "ratio": (float | None, "Fraction of channels to prune, in (0, 1)."),
    "ratios": (str, "Comma-separated prune ratios, each in (0, 1)."),
    "scope": (str, ("γ values that set the threshold: all BatchNorms (reference) or prunable "
                   "(bn1/bn2 only).")),
    "min_channels": (int, "Fewest channels any pruned layer keeps."),
    "eval": (bool, "Measure test accuracy before and right after pruning."),
    # pipeline
    "train_epochs": (int, "Epochs of sparse training."),
    "finetune_epochs": (int, "Epochs of each fine-tune."),
    "train_lr": (float, "SGD LR of the sparse training stage."),
    "finetune_lr": (float, "Adam LR of the fine-tune stages."),
    "finetune_batch_size": (int, "GLOBAL batch of the fine-tune stages (the lab's 100)."),
    "workdir": (str, "Outputs go to <workdir>/checkpoints and <workdir>/plots."),
    # device / process
    "seed": (int, "Random seed (same initial model on every rank; per-rank augmentation)."),
    "cpu": (bool, "Run on CPU (with --gpus N --mode ddp: N gloo processes)."),
    "debug": (bool, "In-process, num_workers=0, anomaly detection, print resolved settings."),
    "mode": (str, ("Multi-GPU mode: ddp (one process per GPU, faster) or dp (one process, "
                  "nn.DataParallel; FP32 only, no --compile).")),
    "mixed_precision": (str, ("no (FP32), bf16 or fp16. FP32 is the default: half precision "
                             "crashed in cublasLtMatmul on multi-GPU in the lab.")),
    "tf32": (bool, ("Allow TF32 convolutions (PyTorch default); --no-tf32 = strict IEEE FP32 "
                   "matmul and conv.")),
    "channels_last": (bool, "channels_last memory format on CUDA."),
    "cudnn_benchmark": (bool, "cudnn.benchmark autotuning on CUDA."),
    "compile": (bool, ("torch.compile the model (the compile time, spent in the first "
                         "step, gets its own line and is left out of img/s).")),
    "log_with": (str | None, "Accelerate tracker, e.g. tensorboard (must be installed; "
                             "default: none)."),
    "dist_timeout": (int, "Seconds a collective may wait before the job fails (no hangs)."),
    "resume": (bool, "Continue from the .last.pth resume state beside --output."),
    "force_resume": (bool, "Resume even if result-changing settings differ."),
    # launcher
    "gpus": (int | None, "Processes/GPUs to use (default: every visible GPU)."),
    "gpu_ids": (str | None, "Comma-separated GPU ids to use, e.g. 0,2."),
    "accelerate_config": (str | None, "Use this Accelerate config YAML instead of writing one."),
    "dry_run": (bool, "Print the accelerate launch command and config YAML; run nothing."),
    "num_machines": (int, "Machines in a multi-node job."),
    "machine_rank": (int, "This machine's rank in a multi-node job (0 = main)."),
    "main_process_ip": (str | None, "IP of the machine-rank-0 node (multi-node)."),
    "main_process_port": (int, "Port of the main process (multi-node)."),
    "json": (bool, "Print one JSON object instead of a table."),
}

DATA = ["dataset", "data_dir", "download", "image_size", "synthetic_train", "synthetic_test",
        "num_workers", "loader", "limit_batches"]
DEVICE = ["seed", "cpu", "debug", "mode", "mixed_precision", "tf32", "channels_last",
          "cudnn_benchmark", "compile", "dist_timeout", "gpus", "gpu_ids", "accelerate_config",
          "dry_run", "num_machines", "machine_rank", "main_process_ip", "main_process_port"]
OPTIM = ["epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "warmup_epochs",
         "sparsity"]
RUN = ["output", "plot", "log_with", "resume", "force_resume"]
PRUNE = ["ratio", "scope", "min_channels", "eval"]

TRAIN_DEFAULTS = {"epochs": 160, "batch_size": 64, "lr": 0.1, "optimizer": "sgd",
                  "weight_decay": 1e-4, "warmup_epochs": 1.0, "sparsity": 0.0}
FINETUNE_DEFAULTS = {"epochs": 20, "batch_size": 100, "lr": 1e-3, "optimizer": "adam",
                     "weight_decay": 0.0}

COMMANDS: list[tuple[str, str, list[str], dict[str, Any]]] = [
    ("train", """Train a ResNet-50 from scratch or --init (with --sparsity: network slimming).

    --sparsity λ adds the L1 penalty on BatchNorm γ (the paper uses 1e-4). Defaults follow the
    network-slimming CIFAR recipe (SGD momentum 0.9, wd 1e-4, lr 0.1,
    ÷10 at 50%/75%) plus a 1-epoch linear warm-up, without which this ResNet-50 diverges.
    Writes checkpoints/model_sparse.pth (λ > 0) or checkpoints/model.pth.""",
     ["init", *OPTIM, *RUN, *DATA, *DEVICE], TRAIN_DEFAULTS),
    ("prune", """Prune the channels whose BatchNorm |γ| is below one global threshold.

    Threshold = the |γ| at position ⌊N·ratio⌋ of all N sorted channels. Writes
    checkpoints/model_prune.pth and plots/<output stem>_gamma.png.""",
     ["checkpoint", "output"] + PRUNE + ["batch_size"] + DATA + DEVICE,
     {"checkpoint": "checkpoints/model_sparse.pth", "batch_size": 100}),
    ("finetune", """Fine-tune a pruned checkpoint with the lab recipe; keep the best epoch.

    Adam, lr 1e-3, ÷10 at 50%/75% of the epochs, FP32 forward. Writes the best checkpoint,
    its curves, a metrics CSV and a resume state.""",
     ["checkpoint"] + OPTIM + RUN + DATA + DEVICE,
     dict(FINETUNE_DEFAULTS, checkpoint="checkpoints/model_prune.pth")),
    ("evaluate", """Test loss and accuracy of a checkpoint on the chosen dataset.""",
     ["batch_size", "json"] + DATA + DEVICE, {"batch_size": 100}),
    ("pipeline", """The whole study: sparse training, prune at each ratio, fine-tune, compare.

    Outputs under --workdir: checkpoints/, plots/ (curves, γ histograms, comparison) and
    report.md.""",
     ["train_epochs", "finetune_epochs", "sparsity", "ratios", "train_lr", "finetune_lr",
      "finetune_batch_size",
      "batch_size", "warmup_epochs", "workdir", "scope", "min_channels", "eval", "log_with",
      "resume", "force_resume"] + DATA + DEVICE,
     # scope prunable: a ratio is the fraction of bn1/bn2 channels removed, whatever the
     # never-pruned bn3 γ look like (zero-initialised, they sit below everything early on).
     {"sparsity": 1e-4, "batch_size": 64, "warmup_epochs": 1.0, "ratios": "0.5,0.9",
      "scope": "prunable"}),
]


# Where one option's meaning depends on the command.
HELP_BY_COMMAND: dict[tuple[str, str], str] = {
    ("train", "output"): "Best checkpoint (default checkpoints/model_sparse.pth with --sparsity "
                         "> 0, else checkpoints/model.pth).",
    ("prune", "output"): "Pruned checkpoint (default checkpoints/model_prune.pth).",
    ("finetune", "output"): "Best checkpoint (default <checkpoint stem>_finetune.pth beside the "
                            "input: model_prune.pth -> model_prune_finetune.pth).",
    ("finetune", "plot"): "Curves figure (default plots/finetuning_results.png for "
                          "model_prune.pth, else plots/<output stem>.png).",
    ("train", "plot"): "Curves figure (default plots/<output stem>.png).",
}


def _option(name: str, default: Any, command: str = "") -> inspect.Parameter:
    typ, help_text = OPTIONS[name]
    help_text = HELP_BY_COMMAND.get((command, name), help_text)
    flag = "--" + name.replace("_", "-")
    decl = [f"{flag}/--no-{flag[2:]}"] if typ is bool else [flag]
    ann = Annotated[typ, typer.Option(*decl, help=help_text, show_default=True)]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=ann)


def _make_command(name: str, doc: str, fields: list[str], defaults: dict[str, Any],
                  dispatch: Dispatch) -> Callable[..., int]:
    base = RunConfig()
    params = []
    if name == "evaluate":
        params.append(inspect.Parameter(
            "checkpoint", inspect.Parameter.POSITIONAL_OR_KEYWORD,
            annotation=Annotated[str, typer.Argument(help="Checkpoint (.pth) to evaluate.")]))
    for f in fields:
        default = defaults.get(f, getattr(base, f))
        if f == "ratios" and not isinstance(default, str):
            default = ",".join(f"{r:g}" for r in default)
        params.append(_option(f, default, name))

    def command(**kwargs: Any) -> int:
        return dispatch(config_from_options(name, kwargs))

    command.__signature__ = inspect.Signature(params)
    command.__doc__ = doc
    command.__name__ = name
    return command


def config_from_options(command: str, values: dict[str, Any]) -> RunConfig:
    """RunConfig from parsed option values (``ratios`` arrives as '0.5,0.9')."""
    values = dict(values)
    if isinstance(values.get("ratios"), str):
        try:
            values["ratios"] = tuple(float(r) for r in values["ratios"].split(",") if r.strip())
        except ValueError:
            raise UserError(f"--ratios {values['ratios']!r} is not a comma-separated list of "
                            "numbers; e.g. --ratios 0.5,0.9") from None
    return RunConfig(command=command, **values)


def build_app(dispatch: Dispatch | None = None, name: str = "slimtune") -> typer.Typer:
    """The Typer app; ``dispatch`` runs a RunConfig (default: in this process)."""
    if dispatch is None:
        from trainer.runner import run_worker

        dispatch = run_worker
    app = typer.Typer(name=name, add_completion=False, no_args_is_help=True,
                      pretty_exceptions_enable=False, rich_markup_mode=None,
                      help="slimtune: prune (network slimming), fine-tune, measure and compare "
                           "the CIFAR ResNet-50 on CPU, one GPU or many.")
    for cmd, doc, fields, defaults in COMMANDS:
        app.command(cmd)(_make_command(cmd, doc, fields, defaults, dispatch))
    from trainer.info import info

    app.command("info")(info)
    from trainer.report import register as register_report

    register_report(app)
    from trainer.bench import register as register_bench

    register_bench(app)
    set_short_help(app)
    return app


def set_short_help(app: typer.Typer) -> None:
    """The command list of ``--help`` shows each command's whole first docstring line
    (Click would cut it at 45 characters)."""
    for info in app.registered_commands:
        doc = info.help or inspect.getdoc(info.callback) or ""
        if info.short_help is None and doc:
            info.short_help = doc.strip().splitlines()[0].rstrip(".")


def _test_report_sleep() -> None:
    """Fault injection for the test-suite: SLIMTUNE_TEST_REPORT_SLEEP=T sleeps T seconds
    before a crashed rank records its failure (widens the window a launcher's SIGTERM hits)."""
    delay = os.environ.get("SLIMTUNE_TEST_REPORT_SLEEP")
    if delay:
        time.sleep(float(delay))


def run_app(app: typer.Typer, argv: list[str] | None = None, prog: str = "slimtune") -> int:
    """Run ``app``; user errors become one ``error: ...`` line and exit code 2."""
    launched = bool(os.environ.get(dist.FAILURE_DIR_ENV))
    try:
        rv = app(args=argv, prog_name=prog, standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except _EXIT as exc:
        return exc.exit_code
    except _USAGE as exc:
        message, code = f"{exc.format_message()} (see --help)", exc.exit_code
    except (*_ABORT, KeyboardInterrupt):
        return 130
    except UserError as exc:
        message, code = str(exc), exc.exit_code
    except Exception as exc:  # noqa: BLE001 -- a crash: keep the traceback, name the rank
        full = disk_full(exc)
        if full is not None:  # every write is atomic: the files already there are whole
            return _fail(f"the disk is full ({full.strerror}); free some space, then run again "
                         "(add --resume to continue a run from its last finished epoch)", 1,
                         launched)
        _test_report_sleep()
        dist.report_to_launcher(f"{type(exc).__name__}: {exc}", 1)
        print(f"[rank {dist.rank()}] crashed:", file=sys.stderr)
        traceback.print_exc()
        return 1
    return _fail(message, code, launched)


def _fail(message: str, code: int, launched: bool) -> int:
    """One ``error:`` line (from the main process), and the report the launcher reads."""
    message = " ".join(message.split("\n"))
    dist.report_to_launcher(message, code)
    if not launched and (dist.is_main() or dist.world_size() == 1):
        print(f"error: {message}", file=sys.stderr)
    return code

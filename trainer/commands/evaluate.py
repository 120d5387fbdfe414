"""``evaluate`` on the worker side: the test loss and accuracy of a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

from trainer.config.settings import RunConfig
from trainer.data.datasets import check_classes
from trainer.errors import ConfigError
from trainer.files.checkpoint import build_model, load_checkpoint
from trainer.measure.profiling import check_input_fits
from trainer.train import dist
from trainer.train.loop import evaluate
from trainer.train.progress import say
from trainer.train.runtime import evaluation_loader, load_data, to_device


def evaluate_model(model, run: RunConfig, accelerator, data) -> dict:
    return evaluate(to_device(model, run, accelerator), evaluation_loader(run, data, accelerator),
                    accelerator)


def cmd_evaluate(run: RunConfig, accelerator) -> dict:
    if not run.checkpoint:
        raise ConfigError("evaluate needs a checkpoint: slimtune evaluate CKPT")
    ckpt = load_checkpoint(run.checkpoint, run.arch)
    data = load_data(run)
    check_classes(data.name, data.num_classes, ckpt["num_classes"], f"checkpoint {run.checkpoint}")
    model = build_model(ckpt)
    check_input_fits(model, run.image_size, "--image-size")
    metrics = evaluate_model(model, run, accelerator, data)
    if run.json:
        if dist.is_main():
            print(json.dumps(metrics))
    else:
        say(f"{Path(run.checkpoint).name}: test loss {metrics['loss']:.4f}, accuracy "
            f"{metrics['accuracy']:.2f}% ({metrics['correct']}/{metrics['total']}) on {data.name}")
    return metrics

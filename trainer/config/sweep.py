"""``sweep``: a grid of studies over comma-separated values of chosen settings (pure Python: the
launcher plans with it, without torch).

``sweep --sparsity 1e-5,1e-4 --seed 0,1`` is the four ``pipeline`` studies of the grid, each
*point* in ``<workdir>/<point>/`` (``sparsity1e-05_seed0``, ...). Points that differ only in
settings that leave the sparse stage alone (LATER: the fine-tunes' LR, epochs, distillation)
share one sparse stage: the first such point trains it, the others link to its file.
"""

from __future__ import annotations

import itertools
import typing
from pathlib import Path

from trainer.config.derived import option_type
from trainer.config.settings import RunConfig
from trainer.errors import ParamError

# the settings a sweep varies: the study's λ, learning rates, distillation, seed and lengths
SWEEPABLE = ("sparsity", "train_lr", "finetune_lr", "kd_alpha", "kd_temperature", "seed",
             "gamma_init", "train_epochs", "finetune_epochs")
# of those, the ones the sparse stage does not read: points differing only in them share it
LATER = ("finetune_lr", "kd_alpha", "kd_temperature", "finetune_epochs")
REPORT_JOB = "report"
SWEEP_REPORT = "sweep.md"
SWEEP_FIGURE = "sweep.png"  # in <workdir>/plots/


def numeric(name: str) -> type | None:
    """int or float for a number setting (the sweep command reads these as text: a list of
    values, or one); None for the rest."""
    typ = option_type(name)
    args = [a for a in typing.get_args(typ) if a is not type(None)] or [typ]
    return args[0] if len(args) == 1 and args[0] in (int, float) else None


def read_grid(values: dict[str, typing.Any]) -> tuple[dict[str, typing.Any], tuple]:
    """The sweep command's option values (numbers as text) -> (the values of the grid's first
    point, the grid: ((setting, (value, ...)), ...) for each SWEEPABLE setting given a list)."""
    out, grid = dict(values), []
    for name, value in values.items():
        typ = numeric(name)
        if typ is None or not isinstance(value, str):
            continue
        parts = [p.strip() for p in value.split(",")]
        if not any(parts):
            raise ParamError("{" + name + "} is empty; give one or more comma-separated "
                             "values, e.g. {" + name + "} " + _example(name), name)
        if len(parts) > 1 and name not in SWEEPABLE:
            raise ParamError("{" + name + "} " + f"{value!r} lists several values, but a sweep "
                             "varies only " + ", ".join("{" + s + "}" for s in SWEEPABLE)
                             + "; give {" + name + "} one value", name, *SWEEPABLE)
        try:
            parsed = tuple(typ(float(p)) if typ is int and float(p).is_integer() else typ(p)
                           for p in parts)
        except ValueError:
            raise ParamError.value(name, value, f" is not a comma-separated list of "
                                   f"{'integers' if typ is int else 'numbers'}; e.g. "
                                   "{" + name + "} " + _example(name), quote=True) from None
        if len(set(parsed)) < len(parsed):
            raise ParamError("{" + name + "} " + f"{value!r} lists a value twice; give each "
                             "once", name)
        out[name] = parsed[0]
        if len(parsed) > 1:
            grid.append((name, parsed))
    return out, tuple(grid)


def _example(name: str) -> str:
    return {"sparsity": "1e-5,1e-4", "seed": "0,1"}.get(name, "0.001,0.01")


def point_name(values: dict[str, typing.Any]) -> str:
    """'sparsity1e-05_seed0': a point's folder, from its values of the grid's settings."""
    return "_".join(f"{name}{value:g}" for name, value in values.items()) or "point"


def points(run: RunConfig) -> list[tuple[str, RunConfig]]:
    """(name, pipeline settings) of every point of ``run``'s grid, in the grid's order."""
    names = [name for name, _ in run.grid]
    out = []
    for combo in itertools.product(*(values for _, values in run.grid)):
        values = dict(zip(names, combo))
        name = point_name(values)
        out.append((name, run.replace(command="pipeline", grid=(),
                                      workdir=str(Path(run.workdir) / name), **values)))
    return out


def sparse_owner(grid_points: list[tuple[str, RunConfig]]) -> dict[str, str]:
    """point -> the point whose sparse stage it uses (itself, or the first point that differs
    from it only in LATER settings)."""
    first: dict[tuple, str] = {}
    out = {}
    for name, run in grid_points:
        key = repr(sorted((n, v) for n, v in run.to_dict().items()
                          if n not in LATER and n != "workdir"))
        out[name] = first.setdefault(key, name)
    return out

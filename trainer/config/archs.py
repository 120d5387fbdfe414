"""The architecture registry: every architecture slimtune slims, by name, with the family that
builds and prunes it, its unpruned shape, what is pruned, and the sparse-training recipe that
fits it. A checkpoint names its arch and the name is looked up here.

A *family* is a module of ``trainer.models`` that exports ``FAMILY`` (a
``trainer.models.family.Family``). Adding an architecture family is one file there plus its
entries below; ``trainer.models.build.family`` imports the module named here (this table is
the only place a module name comes from: a file never names code to import).

Names with a prefix name a model of a library (``torchvision:resnet18``); their families
build it by that name.

Pure Python (no torch): the launcher and the settings checks read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trainer.config.usercode import HOW, looks_like_user_name, parse_user_name
from trainer.errors import ParamError


@dataclass(frozen=True)
class Arch:
    """One named architecture: its family (the module of trainer.models that builds and prunes
    it), the family's parameters, what pruning removes, and its recipe (defaults of
    train/pipeline)."""

    name: str
    family: str
    params: dict[str, Any] = field(default_factory=dict)
    pruned: str = ""
    recipe: dict[str, Any] = field(default_factory=dict)


# Sparse-training recipes (the rest is TRAIN_RECIPE): the paper trains every net with SGD 0.1,
# batch 64, 160 epochs, λ 1e-4 (VGG) or 1e-5 (ResNet-164, DenseNet-40), BatchNorm γ from 0.5.
# The lab's ResNets keep PyTorch's γ = 1 with each block's last BN at 0 and a 1-epoch warm-up,
# without which the ResNet-50 diverges at lr 0.1.
RESNET_RECIPE = {"gamma_init": 1.0, "warmup_epochs": 1.0, "sparsity": 1e-4}
PAPER_RECIPE = {"gamma_init": 0.5, "warmup_epochs": 0.0}
RECIPE_FIELDS = ("gamma_init", "warmup_epochs", "sparsity")
GRAPH_PRUNED = "channel groups of a dependency graph (Torch-Pruning)"

_ARCHS = [
    Arch("resnet50", "resnet", {"block": "bottleneck", "blocks": (3, 4, 6, 3)},
         "each block's bn1/bn2", RESNET_RECIPE),
    Arch("resnet18", "resnet", {"block": "basic", "blocks": (2, 2, 2, 2)},
         "each block's bn1", RESNET_RECIPE),
    Arch("resnet34", "resnet", {"block": "basic", "blocks": (3, 4, 6, 3)},
         "each block's bn1", RESNET_RECIPE),
    Arch("resnet101", "resnet", {"block": "bottleneck", "blocks": (3, 4, 23, 3)},
         "each block's bn1/bn2", RESNET_RECIPE),
    *[Arch(f"vgg{d}", "vgg", {"depth": d}, "every BN", {**PAPER_RECIPE, "sparsity": 1e-4})
      for d in (11, 13, 16, 19)],
    Arch("resnet164", "preresnet", {"depth": 164},
         "every BN (bn1 and the last BN through channel selection)",
         {**PAPER_RECIPE, "sparsity": 1e-5}),
    Arch("densenet40", "densenet", {"depth": 40, "growth": 12},
         "every BN (through channel selection)", {**PAPER_RECIPE, "sparsity": 1e-5}),
]
ARCHS: dict[str, Arch] = {a.name: a for a in _ARCHS}
DEFAULT_ARCH = "resnet50"

TORCHVISION = "torchvision:"  # + the name of any torchvision classification CNN
TIMM = "timm:"  # + the name of a timm CNN with BatchNorm (the timm extra)
# prefix -> (family module, what the name after it is, recipe)
PREFIXES: dict[str, tuple[str, str, dict[str, Any]]] = {
    TORCHVISION: ("torchvision_zoo", "a torchvision classification CNN", RESNET_RECIPE),
    TIMM: ("timm_zoo", "a timm CNN with BatchNorm", RESNET_RECIPE),
}
# Your own model by name: (family module, what it is, recipe); see trainer.config.usercode.
USER = ("user", "your model: a function or class taking num_classes", RESNET_RECIPE)


def user_arch_name(name: object) -> str | None:
    """``name`` when it names a user model (``mynets:make_net``), else None."""
    if not looks_like_user_name(name) or name in ARCHS:
        return None
    return None if any(name.startswith(p) for p in PREFIXES) else name


def arch_choices(joiner: str = "or") -> str:
    """'resnet50, ..., densenet40 or torchvision:NAME (a torchvision classification CNN)'."""
    prefixed = [f"{p}NAME ({what})" for p, (_, what, _) in PREFIXES.items()]
    prefixed.append(f"{HOW} ({USER[1]})")
    return f"{', '.join(ARCHS)} {joiner} {', '.join(prefixed)}"


def get_arch(name: str) -> Arch:
    """The Arch called ``name``; ParamError naming the choices for anything else."""
    if isinstance(name, str) and name in ARCHS:
        return ARCHS[name]
    if isinstance(name, str):
        for prefix, (module, _, recipe) in PREFIXES.items():
            if name.startswith(prefix) and name[len(prefix):]:
                return Arch(name, module, {"model": name[len(prefix):]}, GRAPH_PRUNED, recipe)
    if looks_like_user_name(name):  # checked, never imported here (trainer.config.usercode)
        module, factory = parse_user_name(name)
        return Arch(name, USER[0], {"module": module, "factory": factory}, GRAPH_PRUNED,
                    USER[2])
    raise ParamError.value("arch", name, f" is unknown; use one of {arch_choices()}", quote=True)


def recipes_text(indent: str = "      ") -> str:
    """Two lines per group of archs that prune and train alike (for --help)."""
    groups: dict[tuple, list[str]] = {}
    named = [get_arch(f"{p}NAME") for p in PREFIXES]
    named.append(Arch(HOW, USER[0], {}, GRAPH_PRUNED, USER[2]))
    for arch in [*ARCHS.values(), *named]:
        groups.setdefault((arch.pruned, tuple(arch.recipe.items())), []).append(arch.name)
    lines = []
    for (pruned, recipe), names in groups.items():
        r = dict(recipe)
        lines.append(f"{indent}{', '.join(names)}: γ from {r['gamma_init']:g}, warm-up "
                     f"{r['warmup_epochs']:g} epoch, pipeline λ {r['sparsity']:g}")
        lines.append(f"{indent}  prunes {pruned}")
    return "\n".join(lines)


# The recipe settings of a command that builds no model (finetune, prune, evaluate).
FALLBACK = {"gamma_init": 1.0, "warmup_epochs": 0.0, "sparsity": 0.0}


def with_recipe(run):
    """``run`` (a RunConfig) with the arch's recipe where the command line left a recipe
    setting at None, and ``arch`` resolved for the commands that build a model."""
    if run.command not in ("train", "pipeline"):
        return run.replace(**{k: v for k, v in FALLBACK.items() if getattr(run, k) is None})
    arch = get_arch(run.arch or DEFAULT_ARCH)
    return run.replace(arch=arch.name, **{k: arch.recipe[k] for k in RECIPE_FIELDS
                                           if getattr(run, k) is None})

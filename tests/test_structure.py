"""The house rules of the layout (README's code map): the launcher starts at once (no torch for
--help, config or --dry-run), the packages import one way (no import circle, lazy imports
included; each subpackage of trainer/ only imports the ones below it), the torch-free front
end is a package boundary, and adding an architecture family is a file plus a registry entry.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, cli_env

PACKAGES = ("trainer", "launch", "slimtune")
# trainer's subpackages, lowest first: each imports only those before it (and trainer.errors).
# config: pure settings; models, data: what is built and read; prune: the slimming engine;
# files: checkpoints and exports; train: the loop; measure: counts, timings, figures;
# commands: what each command does; cli: the command line (which reaches the rest lazily).
LAYERS = ("config", "models", "data", "prune", "files", "train", "measure", "commands", "cli")
# The torch-free front end: nothing these import at module level may import torch.
HEAVY = ("torch", "torchvision", "accelerate", "thop", "torch_pruning", "safetensors", "numpy",
         "matplotlib", "timm", "onnx", "onnxruntime", "PIL")


def _modules() -> list[Path]:
    return [p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))
            if p.stem != "__main__"]


def _name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_only: bool = False) -> tuple[set[str], set[str]]:
    """(project modules, third-party top-level packages) that ``path`` imports: anywhere in
    its code, or with ``top_only`` at module level only."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_only else list(ast.walk(tree))
    ours, theirs = set(), set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            if n.split(".")[0] in PACKAGES:
                if _is_module(n):
                    ours.add(n)
            else:
                theirs.add(n.split(".")[0])
    return ours, theirs


def _is_module(name: str) -> bool:
    parts = name.split(".")
    return (REPO.joinpath(*parts).with_suffix(".py").is_file()
            or REPO.joinpath(*parts, "__init__.py").is_file())


def _graph(top_only: bool = False) -> dict[str, set[str]]:
    return {_name(p): _imports(p, top_only)[0] for p in _modules()}


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert len(graph) > 40  # the walk saw the packages


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] == "trainer" and len(parts) > 2 and parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return None


def test_each_layer_imports_only_the_layers_below_it():
    graph = _graph()
    wrong = [(m, i) for m, imported in graph.items() for i in imported
             if _layer(m) is not None and _layer(i) is not None and _layer(i) > _layer(m)]
    assert not wrong, "\n".join(f"{m} imports {i}" for m, i in wrong)


def test_the_packages_depend_one_way():
    """launch is on top of trainer; slimtune (the Python API) on top of trainer; trainer
    imports neither, and launch does not import the API."""
    graph = _graph()
    assert not [(m, i) for m in graph if m.startswith("trainer") for i in graph[m]
                if i.startswith(("launch", "slimtune"))]
    assert not [(m, i) for m in graph if m.startswith("launch") for i in graph[m]
                if i.startswith("slimtune")]


def test_the_python_api_is_a_layer_above_the_commands():
    """slimtune (the library) calls the engine, up to trainer.commands at most: never the
    command line (trainer.cli, launch), which speaks flags and exit codes."""
    graph = _graph()
    wrong = [(m, i) for m in graph if m.startswith("slimtune") for i in graph[m]
             if i.startswith(("launch", "trainer.cli"))]
    assert not wrong, wrong
    assert any(i.startswith("trainer.prune") for m in graph if m.startswith("slimtune")
               for i in graph[m])


def test_the_front_end_is_torch_free_at_import():
    """Everything that ``launch.cli`` and ``trainer.config`` import at module level, all the way
    down, imports no torch (nor another heavy package) at module level: the front end is a
    package boundary, and the torch side is reached only inside the functions that run."""
    graph = _graph(top_only=True)
    paths = {_name(p): p for p in _modules()}
    seen, todo = set(), ["launch.cli", "trainer.cli.app", *[m for m in paths
                                                          if m.startswith("trainer.config")]]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo += [m for m in graph[module] if m in graph]
        for parent in _parents(module):
            todo.append(parent)
    heavy = {m: sorted(_imports(paths[m], top_only=True)[1] & set(HEAVY)) for m in seen}
    assert not {m: h for m, h in heavy.items() if h}
    assert "trainer.cli.app" in seen and "trainer.config.settings" in seen


def _parents(module: str) -> list[str]:
    """The packages whose ``__init__`` runs before ``module``."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def test_every_registered_family_is_one_module_with_a_family():
    from trainer.config.archs import ARCHS, PREFIXES, get_arch
    from trainer.models.family import Family

    names = {a.family for a in ARCHS.values()} | {get_arch(f"{p}x").family for p in PREFIXES}
    names.add(get_arch("mynets:make_net").family)  # the user's own models
    for name in names:
        module = importlib.import_module(f"trainer.models.{name}")
        assert isinstance(module.FAMILY, Family), name


def test_every_setting_has_a_kind():
    """Each setting is declared once, with its kind: a field added without one fails here."""
    from trainer.config.derived import option_help
    from trainer.config.settings import KINDS, RunConfig

    for f in dataclasses.fields(RunConfig):
        assert f.metadata.get("kind") in KINDS, f"{f.name} has no kind (setting(..., kind))"
        assert f.metadata.get("help") or f.name == "arch", f"{f.name} has no help text"
        assert option_help(f.name)


def _torch_after(*argv: str, cwd: Path) -> tuple[int, bool, str]:
    """Run the launcher's app on ``argv`` in a fresh interpreter: (exit code, torch imported?,
    output)."""
    code = ("import sys\nfrom launch.cli import make_app\nfrom trainer.cli.app import run_app\n"
            f"rc = run_app(make_app(), {list(argv)!r})\n"
            "print('TORCH_IMPORTED', 'torch' in sys.modules, 'accelerate' in sys.modules)\n"
            "sys.exit(rc)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=cli_env(),
                       capture_output=True, text=True, timeout=120)
    last = r.stdout.strip().splitlines()[-1]
    return r.returncode, last != "TORCH_IMPORTED False False", r.stdout + r.stderr


@pytest.mark.parametrize("argv", [
    ["--help"], ["finetune", "--help"], ["pipeline", "--help"], ["profile", "--help"],
    ["export", "--help"],
    ["config", "--gpus", "2", "--output", "acc.yaml"],
    ["finetune", "--cpu", "--gpus", "2", "--dry-run"],
    ["pipeline", "--gpus", "4", "--dry-run"],
    ["evaluate", "x.pth", "--dry-run"],
], ids=lambda a: " ".join(a))
def test_the_front_end_imports_no_torch(argv, tmp_path):
    """--help, config and --dry-run start at once: neither torch nor accelerate is imported."""
    code, torch_imported, output = _torch_after(*argv, cwd=tmp_path)
    assert code == 0, output
    assert not torch_imported, output

"""The house rules a user feels: the launcher starts at once (no torch for --help, config or
--dry-run), and the packages import one way (no import circle, lazy imports included)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, cli_env

PACKAGES = ("trainer", "launch")


def _imports(path: Path) -> set[str]:
    """Project modules ``path`` imports anywhere in its code (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in PACKAGES and _is_module(n)}
    return found


def _is_module(name: str) -> bool:
    parts = name.split(".")
    return (REPO.joinpath(*parts).with_suffix(".py").is_file()
            and parts[-1] not in ("__init__", "__main__"))


def _graph() -> dict[str, set[str]]:
    return {f"{p.parent.name}.{p.stem}": _imports(p) for pkg in PACKAGES
            for p in sorted((REPO / pkg).glob("*.py")) if p.stem not in ("__init__", "__main__")}


def test_no_import_circle_in_trainer_or_launch():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert len(graph) > 20  # the walk saw the packages


def test_trainer_never_imports_launch():
    graph = _graph()
    assert not [(m, i) for m in graph if m.startswith("trainer.") for i in graph[m]
                if i.startswith("launch")]


def _torch_after(*argv: str, cwd: Path) -> tuple[int, bool, str]:
    """Run the launcher's app on ``argv`` in a fresh interpreter: (exit code, torch imported?,
    output)."""
    code = ("import sys\nfrom launch.cli import make_app\nfrom trainer.cli import run_app\n"
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

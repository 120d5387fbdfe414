"""The documentation stays true: docs/cli.md matches the CLI, README.md stays short, every
relative link (and #anchor) in README.md and docs/*.md resolves, and the README's test command
is the one CI runs. Fast: builds the app (no torch) and reads files."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from tests.helpers import REPO

DOCS = REPO / "docs"
README = REPO / "README.md"
MAX_README_LINES = 150
TEST_COMMAND = "python -m pytest -q"
REGENERATE = ("docs/cli.md is stale (a command or an option changed): run "
              "`python docs/make_cli_md.py` and commit docs/cli.md")


def _generator():
    spec = importlib.util.spec_from_file_location("make_cli_md", DOCS / "make_cli_md.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _outline(text: str) -> dict[str, set[str]]:
    """{section heading: the --options named in it}."""
    sections: dict[str, set[str]] = {}
    for part in re.split(r"^## ", text, flags=re.M)[1:]:
        heading, _, body = part.partition("\n")
        sections[heading.strip()] = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]", body))
    return sections


def test_cli_md_is_what_the_generator_writes():
    gen = _generator()
    want = gen.render()
    have = (DOCS / "cli.md").read_text(encoding="utf-8")
    made_with = re.search(r"\(typer ([^,]+), ", have)
    if made_with and made_with.group(1) != gen.typer_version():
        # Another typer lays the help out differently (metavars, wrapping); the commands and
        # their options must still be the same.
        assert _outline(have) == _outline(want), REGENERATE
    else:
        assert have == want, REGENERATE


def test_cli_md_lists_every_command():
    sections = _outline((DOCS / "cli.md").read_text(encoding="utf-8"))
    for command in ("train", "prune", "finetune", "evaluate", "pipeline", "config"):
        assert command in sections, command
    assert "--sparsity" in sections["train"] and "--ratio" in sections["prune"]


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines (at most {MAX_README_LINES}); move detail to docs/")


def _without_code(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#{1,6} (.+)$", _without_code(path.read_text(encoding="utf-8")),
                          flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def _markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def test_every_relative_link_resolves():
    broken = []
    for md in _markdown_files():
        text = _without_code(md.read_text(encoding="utf-8"))
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (md.parent / file_part).resolve() if file_part else md
            where = f"{md.relative_to(REPO)}: ({target})"
            if not dest.exists():
                broken.append(f"{where} -> no such file")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{where} -> no heading #{anchor}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_links_every_doc():
    readme = README.read_text(encoding="utf-8")
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if f"(docs/{p.name})" not in readme]
    assert not missing, f"README.md does not link: {missing}"


def test_readme_test_command_is_the_one_ci_runs():
    readme = README.read_text(encoding="utf-8").splitlines()
    assert f'pip install -e ".[test]" && {TEST_COMMAND}' in readme, (
        f"README.md's quick start must show: pip install -e \".[test]\" && {TEST_COMMAND}")
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    runs = [line for line in ci if line.startswith("python -m pytest")]
    assert runs == [TEST_COMMAND], f".ci/run runs {runs}, the README shows {TEST_COMMAND!r}"

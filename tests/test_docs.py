"""The front door and the docs: every Python block of README.md and docs/*.md runs as written.

A block that cannot run here is preceded by the line ``<!-- not run: REASON -->`` (a reason is
required); it must still compile. The README stays a front door of at most 250 lines, and
``run --help`` is plain text grouped by config section.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"<!-- not run: (.*?) -->")
FENCE = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def blocks(text: str) -> list[tuple[int, str, str | None]]:
    """``(line, source, reason not to run or None)`` of each ```python block of ``text``."""
    out = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.fullmatch(before.strip())
        out.append((line, match.group(1), None if marker is None else marker.group(1).strip()))
    return out


ALL = [
    (page.relative_to(ROOT).as_posix(), line, source, reason)
    for page in PAGES
    for line, source, reason in blocks(page.read_text())
]
RUN = [pytest.param(src, id=f"{page}:{line}") for page, line, src, reason in ALL if not reason]
SKIPPED = [(f"{page}:{line}", source, reason) for page, line, source, reason in ALL if reason]


def test_blocks_finds_code_and_markers():
    text = (
        "intro\n```python\nx = 1\n```\n\n<!-- not run: needs weights -->\n```python\ny = 2\n```\n"
        "```sh\nmake run\n```\n"
    )
    assert blocks(text) == [(2, "x = 1\n", None), (7, "y = 2\n", "needs weights")]


def test_the_docs_have_blocks_and_every_skip_has_a_reason_and_compiles():
    assert len(RUN) >= 3  # the README's example and docs/api.md's
    for name, source, reason in SKIPPED:
        assert reason, name
        compile(source, name, "exec")


@pytest.mark.parametrize("source", RUN)
def test_python_block_runs_as_written(source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(source, "<doc block>", "exec"), {"__name__": "__doc_block__"})


def test_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for command in ("make test", "make test-slow", "make run"):
        assert command in readme
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / link).is_file(), link


def test_doc_links_resolve():
    for page in PAGES:
        for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / link).exists(), f"{page.name}: {link}"


def test_run_help_is_grouped_plain_text(capsys):
    from sjc_jax import cli
    from sjc_jax.config import SECTIONS

    assert cli.main(["run", "--help"]) == 0
    text = capsys.readouterr().out
    for section in SECTIONS:
        assert f"\n{section}:" in text or f"\n{section} " in text, section
    assert "`" not in text and "``" not in text
    assert "--estimator" in text and "sjc (SJC's PAAS, the original)" in text

"""The README and the docs site cannot rot: every ```python block runs, every relative link and every
repository file they name exists, no page points outside the repository, and every number is measured."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from runs import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
TOP = ("configs/", "scripts/", "tests/", "dyrelu/", "models/", "data/", "engine/", "docs/", ".ci/")
ROOT_FILES = ("train.py", "eval.py", "pyproject.toml", "mkdocs.yml", "README.md")


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def _fences(text: str):
    """(language, code, first line number) of every fenced block at the start of a line."""
    out, lang, buf, start = [], None, [], 0
    for i, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^(\s*)```\s*([\w+-]*)\s*$", line)
        if m and lang is None:
            lang, buf, start, indent = m.group(2) or "text", [], i + 1, len(m.group(1))
        elif m and lang is not None:
            out.append((lang, "\n".join(buf), start))
            lang = None
        elif lang is not None:
            buf.append(line[indent:] if line[:indent].strip() == "" else line)
    assert lang is None, "unclosed code fence"
    return out


def _prose(text: str) -> str:
    """The text outside fenced blocks."""
    return re.sub(r"^\s*```.*?^\s*```[^\n]*$", "", text, flags=re.S | re.M)


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    """The blocks of one page run in order in one namespace (a later block may use an earlier one's
    names), from the repository root, as a reader pasting them into `python` there would."""
    blocks = [(code, line) for lang, code, line in _fences(page.read_text()) if lang == "python"]
    if not blocks:
        pytest.skip("no python blocks")
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    ns: dict = {"__name__": "__docs__"}
    for code, line in blocks:
        try:
            exec(compile(code, f"{_rel(page)}:{line}", "exec"), ns)
        except Exception as e:  # name the block, not just the exception
            raise AssertionError(f"{_rel(page)}, block at line {line}: {type(e).__name__}: {e}") from e


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_links_and_named_files_exist(page):
    text = page.read_text()
    prose = _prose(text)
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if re.match(r"^[a-z]+://|^mailto:|^#", target):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.exists():
            missing.append(target)
    for span in re.findall(r"`([^`\n]+)`", prose):
        name = span.split(":")[0].strip()
        if " " in name or any(c in name for c in "<>*{}$=[]|,") or ".." in name:
            continue
        if name.startswith(TOP) or name in ROOT_FILES:
            if not (ROOT / name).exists():
                missing.append(span)
    assert not missing, f"{_rel(page)} names what does not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_no_page_names_a_file_outside_the_repository(page):
    bad = re.findall(r"REFERENCE\.md|ARCHITECTURE\.md|/work/|shared/paper|\.\./shared|paper\.txt|supp\w*\.txt",
                     page.read_text())
    assert not bad, f"{_rel(page)} points outside the repository: {bad}"


def test_every_docs_page_is_in_the_site_nav():
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    listed = {next(iter(item.values())) for item in nav}
    pages = {_rel(p)[len("docs/"):] for p in (ROOT / "docs").rglob("*.md")}
    assert pages == listed, f"not in nav: {sorted(pages - listed)}; in nav, no page: {sorted(listed - pages)}"


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 260


def test_every_number_is_measured():
    """`TBD-MEASURED` marks a number still to be measured on the final commit; none may ship."""
    left = {_rel(p): p.read_text().count("TBD-MEASURED") for p in PAGES}
    assert not {k: v for k, v in left.items() if v}, f"unmeasured numbers left: {left}"

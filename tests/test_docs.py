"""README.md and docs/ point at files that exist: every relative link, every path in README's
layout block, and every page and result file is listed in the docs index."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")  # [text](target) or [text](target#anchor)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    targets = [t for t in LINK.findall(page.read_text()) if "://" not in t]
    missing = [t for t in targets if not (page.parent / t).exists()]
    assert not missing, missing


def test_readme_layout_names_existing_paths():
    text = (ROOT / "README.md").read_text()
    block = text.split("## Layout", 1)[1].split("```")[1]
    paths = [p for line in block.splitlines() if line.strip()
             for p in re.findall(r"^([\w./]+(?:, [\w./]+)*)", line)[0].split(", ")]
    assert len(paths) >= 8, block
    for p in paths:
        assert (ROOT / p).exists(), p


def test_docs_index_lists_every_page_and_results_folder():
    index = (ROOT / "docs" / "README.md").read_text()
    linked = set(LINK.findall(index))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"README.md"}
    assert pages <= linked, sorted(pages - linked)
    assert any(t.startswith("results/") for t in linked)
    results = {p.name for p in (ROOT / "docs" / "results").iterdir()} - {"README.md"}
    listed = set(LINK.findall((ROOT / "docs" / "results" / "README.md").read_text()))
    # every .md result is listed; its .json / .png twins sit beside it under the same stem
    assert {r for r in results if r.endswith(".md")} <= listed
    stems = {Path(r).stem for r in listed}
    assert all(Path(r).stem in stems for r in results), sorted(results)

"""The front door and the documentation site: README short, its links alive, every page of docs/ in the site's
navigation (CI's `mkdocs build --strict` checks the links inside the site; this runs without MkDocs)."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")


def _nav_pages(entries) -> set[str]:
    pages = set()
    for entry in entries:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages |= _nav_pages(value) if isinstance(value, list) else {value}
    return pages


def test_readme_stays_a_front_door():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_every_relative_link_in_the_readme_and_the_cluster_guide_names_a_file():
    for document in (ROOT / "README.md", ROOT / "cluster" / "README.md"):
        targets = [match.group(1) for match in LINK.finditer(document.read_text()) if "://" not in match.group(1)]
        missing = [target for target in targets if not (document.parent / target).exists()]
        assert not missing, f"{document.name}: {missing}"


def test_every_page_is_in_the_sites_navigation():
    site = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    pages = {path.relative_to(ROOT / "docs").as_posix() for path in (ROOT / "docs").rglob("*.md")}
    pages = {page for page in pages if not page.startswith(".")}  # MkDocs leaves dot-folders out (.snippets: included)
    assert _nav_pages(site["nav"]) == pages

"""The documentation site's sources: the API reference covers every public name, from the top of the package
only (its pages must not depend on module paths), and the README's links into docs/ resolve.
`mkdocs build --strict` itself runs in `make test`."""

from __future__ import annotations

import re
from pathlib import Path

import fewshot

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def api_directives() -> list[str]:
    return [name for page in sorted((DOCS / "api").glob("*.md"))
            for name in re.findall(r"^::: *(\S+)", page.read_text(), flags=re.M)]


def test_api_reference_documents_every_public_name_once():
    documented = api_directives()
    public = sorted(set(fewshot.__all__) - {"__version__"})
    assert sorted(documented) == sorted(f"fewshot.{name}" for name in public)


def test_api_reference_uses_top_level_names_only():
    assert [name for name in api_directives() if name.count(".") != 1] == []


def test_readme_links_into_docs_resolve():
    links = re.findall(r"\]\(((?:docs/)[^)#]+)", (ROOT / "README.md").read_text())
    assert links, "the README links into docs/"
    assert [link for link in links if not (ROOT / link).is_file()] == []


def test_every_docs_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert [page for page in pages if page not in nav] == []

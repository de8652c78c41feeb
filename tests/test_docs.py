"""The README stays a newcomer's page and every link in it and in docs/ leads somewhere inside the
repository (issue 15: "README under 170 lines; every link resolves inside the repository")."""
import re
from pathlib import Path

import pytest

from tests.conftest import REPO

README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
MAX_README_LINES = 170

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # https:, mailto:, ...


def _prose(text: str) -> str:
    """The page without its fenced code blocks: `a[0](b)` in a Python example is not a link."""
    return _FENCE.sub("", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", _prose(page.read_text()), re.M)}


def _links(page: Path) -> list[str]:
    return [m.group(1) for m in _LINK.finditer(_prose(page.read_text()))]


def _problem(page: Path, link: str) -> str | None:
    """Why `link` on `page` does not resolve inside the repository (None when it does)."""
    if _EXTERNAL.match(link):
        return None
    path, _, anchor = link.partition("#")
    target = (page.parent / path).resolve() if path else page
    if target != REPO and REPO not in target.parents:
        return f"{link}: expected a path inside the repository, got {target}"
    if not target.exists():
        return f"{link}: expected an existing file or folder, {target.relative_to(REPO)} does not exist"
    if anchor and target.suffix == ".md" and anchor not in _anchors(target):
        return f"{link}: {target.relative_to(REPO)} has no heading with the anchor #{anchor}"
    return None


def test_pages_found():
    assert README.is_file() and len(PAGES) > 1, PAGES


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n < MAX_README_LINES, f"README.md: expected fewer than {MAX_README_LINES} lines, has {n}; move detail to docs/"


def test_readme_first_screen_has_the_two_commands():
    head = "\n".join(README.read_text().splitlines()[:15])
    for command in ("make demo", "make test"):
        assert command in head, f"README.md: expected `{command}` in the first 15 lines"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    problems = [p for link in _links(page) if (p := _problem(page, link))]
    assert not problems, f"{page.relative_to(REPO)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_mention_of_outside_folders(page):
    assert "../shared" not in page.read_text(), f"{page.relative_to(REPO)}: mentions ../shared, outside the repository"


def test_every_doc_is_linked_from_the_readme():
    linked = {(README.parent / link.partition("#")[0]).resolve() for link in _links(README)}
    orphans = [p.relative_to(REPO).as_posix() for p in PAGES[1:] if p.resolve() not in linked]
    assert not orphans, f"README.md: expected a link to each page of docs/, missing {orphans}"


def test_link_checker_catches_broken_links():
    """The checker itself: a missing file, an escape from the repository and a wrong anchor fail."""
    page = REPO / "docs" / "method.md"
    assert _problem(page, "missing-page.md") is not None
    assert _problem(page, "../../outside.md") is not None
    assert _problem(page, "recipes.md#no-such-heading") is not None
    assert _problem(page, "recipes.md#inside-llm-foundry") is None
    assert _problem(page, "https://example.org/x") is None
    assert _slug("Drop-in use in your own Composer `Trainer`") == "drop-in-use-in-your-own-composer-trainer"


def test_layout_page_lists_every_package():
    """docs/layout.md is the map of the code: a package the wheel ships but the page omits fails."""
    import tomllib

    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    page = (REPO / "docs" / "layout.md").read_text()
    missing = [p for p in packages if p != "composer_sheared" and ".yamls" not in p and f"`{p}`" not in page]
    assert not missing, f"docs/layout.md does not list {missing}"

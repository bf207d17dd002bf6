"""The documentation: every relative link resolves; LICENSE and CITATION.cff are there and
agree with pyproject.toml."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_CODE = re.compile(r"`[^`\n]*`")
_INLINE = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFDEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
    """The page without code blocks and code spans (links there are not links)."""
    return _CODE.sub("", _FENCE.sub("", text))


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens,
    ``-1``, ``-2`` ... for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for title in _HEADING.findall(_prose(page.read_text())):
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)  # a link's text stays
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """Every relative link of ``page`` whose file (or heading anchor) does not exist."""
    prose = _prose(page.read_text())
    bad = []
    for target in [*_INLINE.findall(prose), *_REFDEF.findall(prose)]:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.is_relative_to(root) or not dest.exists():
            bad.append(f"{page.relative_to(root)}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{page.relative_to(root)}: {target} (no such heading)")
    return bad


def test_every_relative_link_resolves():
    assert len(PAGES) > 5
    assert [b for page in PAGES for b in broken_links(page)] == []


def test_the_link_check_finds_broken_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Two words, here\n")
    page = tmp_path / "README.md"
    page.write_text(
        "# Title\n\nSee [design](DESIGN.md), [a](docs/a.md#two-words-here), "
        "[b](docs/a.md#nope), [up](#title), [gone](#missing) and\n[c]"
        "(docs/missing.md \"a title\").\n\n[ref]: docs/a.md\n[bad]: ../outside.md\n\n"
        "```\n[not a link](nowhere.md)\n```\nand `[code](nowhere.md)`, https://x.org/y.md\n")
    assert broken_links(page, tmp_path) == [
        "README.md: DESIGN.md (no such file)",
        "README.md: docs/a.md#nope (no such heading)",
        "README.md: #missing (no such heading)",
        "README.md: docs/missing.md (no such file)",
        "README.md: ../outside.md (no such file)",
    ]


def test_license_is_the_one_pyproject_declares():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]
    assert declared == {"text": "MIT"}
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert re.search(r"^Copyright \(c\) \d{4} \S", text, re.M)
    assert "Permission is hereby granted, free of charge" in text
    assert 'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND' in text


# CFF 1.2.0: the root keys and what a reference, a person and an entity may hold (the subset
# of the specification's schema this file uses must stay within it)
CFF_ROOT = {"abstract", "authors", "cff-version", "commit", "contact", "date-released", "doi",
            "identifiers", "keywords", "license", "license-url", "message",
            "preferred-citation", "references", "repository", "repository-artifact",
            "repository-code", "title", "type", "url", "version"}
CFF_PERSON = {"family-names", "given-names", "name-particle", "name-suffix", "affiliation",
              "email", "orcid", "website", "alias"}


def test_citation_cff_is_valid_cff_1_2_0_for_this_software():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert {"authors", "cff-version", "message", "title"} <= set(cff) <= CFF_ROOT
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert cff["license"] == project["license"]["text"]
    assert str(cff["version"]) == project["version"]
    refs = cff["references"]
    assert len(refs) == 3
    readme = " ".join((ROOT / "README.md").read_text().split())
    for ref in [*refs, {"type": "generic", "title": cff["title"], "authors": cff["authors"]}]:
        assert {"authors", "title", "type"} <= set(ref)
        for who in ref["authors"]:
            assert who.get("name") or (set(who) <= CFF_PERSON and who.get("family-names"))
    for ref in refs:  # the studies README names, with their first author and year
        title = " ".join(ref["title"].split())
        first = ref["authors"][0]["family-names"]
        assert f"{first} et al. {ref['year']}, *{title}*" in readme, title


@pytest.mark.parametrize("name", ["LICENSE", "CITATION.cff"])
def test_readme_points_at(name):
    assert f"]({name})" in (ROOT / "README.md").read_text()

"""The README is a newcomer's page, and it and the manual in docs/ link only to what exists."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
README = ROOT / "README.md"
PAGES = (README, *sorted((ROOT / "docs").glob("*.md")))
README_MOST_LINES = 400

FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
CODE_SPAN = re.compile(r"(`+).+?\1", re.S)
LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def prose(text: str) -> str:
    """The text links can be in: no fenced blocks, no code spans."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text, lower case, punctuation but - and _ dropped,
    spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's words
    text = text.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor, the second of a name with -1 as GitHub numbers them."""
    seen: Counter[str] = Counter()
    found = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text())):
        base = slug(heading)
        found.add(f"{base}-{seen[base]}" if seen[base] else base)
        seen[base] += 1
    return found


def links(page: Path) -> list[str]:
    return LINK.findall(prose(page.read_text()))


def relative(target: str) -> bool:
    return not re.match(r"[a-z][a-z0-9+.-]*:", target)  # http:, https:, mailto:


def test_slugs_follow_githubs_rules() -> None:
    assert slug("`serve` options and the config file") == "serve-options-and-the-config-file"
    assert slug("CDI (podman, containerd, CRI-O)") == "cdi-podman-containerd-cri-o"
    assert slug("Sharing a GPU (time-slicing)") == "sharing-a-gpu-time-slicing"
    assert slug("A 5-minute tour") == "a-5-minute-tour"


def test_the_checker_sees_a_broken_link(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [bad](#nothing) `[code](#nothing)`\n")
    assert links(page) == ["#title", "#nothing"]
    assert anchors(page) == {"title"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in filter(relative, links(page)):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no {os.path.relpath(file, ROOT)}")
        elif anchor and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {os.path.relpath(file, ROOT)}")
    assert broken == []


def test_the_readme_is_short() -> None:
    assert len(README.read_text().splitlines()) <= README_MOST_LINES


def test_the_readme_links_every_page_of_the_manual() -> None:
    linked = {
        (ROOT / target.partition("#")[0]).resolve()
        for target in links(README)
        if relative(target) and target.startswith("docs/")
    }
    pages = set((ROOT / "docs").glob("*.md"))
    assert pages and {p.resolve() for p in pages} <= linked


INSTALL = (ROOT / "install.sh").read_text()


def first_command() -> str:
    block = re.search(r"^```sh\n(.*?)\n```", README.read_text(), re.M | re.S)
    assert block is not None, "the README has no sh block"
    return block.group(1)


def test_the_readmes_first_command_installs_then_does_what_install_sh_says_next() -> None:
    steps = first_command().split(" && ")
    assert "./install.sh" in steps
    said_next = INSTALL.split("\nnext:\n", 1)[1].splitlines()[0].split("#")[0].strip()
    assert steps[-1] == said_next


def test_the_manual_uninstall_removes_every_path_install_sh_installs_to() -> None:
    # install.sh names each destination once, in one block (venv=/opt/..., man=...)
    block = INSTALL.split("\n# Where each thing goes", 1)[1].split("\n\n", 1)[0]
    destinations = re.findall(r"^[a-z]+=(/[^\s]+)$", block, re.M)
    assert len(destinations) >= 7, destinations
    operating = (ROOT / "docs" / "operating.md").read_text()
    by_hand = next(block for block in re.findall(r"^```sh\n(.*?)^```", operating, re.M | re.S)
                   if block.startswith("systemctl disable"))  # fmt: skip
    for path in destinations:
        assert path in by_hand, path


def test_the_configuration_page_names_every_setting() -> None:
    from monitor.daemon.config import SETTINGS

    page = (ROOT / "docs" / "configuration.md").read_text()
    missing = [f.name for f in SETTINGS if f"`{f.metadata['key'] or f.name}" not in page]
    assert not missing


def test_how_it_is_built_names_every_module() -> None:
    page = (ROOT / "docs" / "development.md").read_text()
    named = set(re.findall(r"`([^`\s]+\.py)`", page))
    modules = [
        p.relative_to(ROOT / "monitor")
        for p in (ROOT / "monitor").rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py") and "protos" not in p.parts
    ]
    unnamed = [str(m) for m in modules if not any(str(m).endswith(n) for n in named if m.name in n)]
    assert not unnamed

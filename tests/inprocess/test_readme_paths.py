"""The README and the manual in docs/ name the daemon's paths as the daemon itself says them."""

from __future__ import annotations

import os
from pathlib import Path

from monitor.daemon.config import default_cdi_dir

ROOT = Path(__file__).parents[2]


def manual() -> str:
    return "\n".join(p.read_text() for p in (ROOT / "README.md", *sorted(ROOT.glob("docs/*.md"))))


def test_the_docs_give_the_cdi_directory_the_daemon_names() -> None:
    default = default_cdi_dir()
    assert default is not None  # the suite runs as root
    said = Path(os.path.realpath(default))  # the daemon claims, and names, the real directory
    text = manual()
    assert f"CDI spec in {said})`" in text  # the example of the line it logs when it is up
    assert f"`{said}/hotplug-monitor.json`" in text
    if said != default:
        assert str(default) not in text

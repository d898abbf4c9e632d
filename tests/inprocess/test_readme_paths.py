"""The README names the daemon's paths as the daemon itself says them."""

from __future__ import annotations

import os
from pathlib import Path

from monitor.daemon.config import default_cdi_dir

README = Path(__file__).parents[2] / "README.md"


def test_the_readme_gives_the_cdi_directory_the_daemon_names() -> None:
    default = default_cdi_dir()
    assert default is not None  # the suite runs as root
    said = Path(os.path.realpath(default))  # the daemon claims, and names, the real directory
    readme = README.read_text()
    assert f"CDI spec in {said})`" in readme  # the example of the line it logs when it is up
    assert f"`{said}/hotplug-monitor.json`" in readme
    if said != default:
        assert str(default) not in readme

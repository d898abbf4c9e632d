"""Where the daemon puts its socket and state by default: plain calls."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from monitor.daemon import config
from monitor.wire import paths


def test_default_paths_depend_on_who_runs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert paths.default_socket() == Path("/run/hotplug-monitor/hotplug-monitor.sock")
    assert config.default_state_dir() == Path("/var/lib/hotplug-monitor")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    monkeypatch.setenv("XDG_STATE_HOME", "/home/u/.state")
    assert paths.default_socket() == Path("/run/user/1000/hotplug-monitor.sock")
    assert config.default_state_dir() == Path("/home/u/.state/hotplug-monitor")

"""``hotplug-monitor kubelet-plugin`` as an operator meets it: its systemd unit, its one-line
refusals of bad flags, a plugin started before the kubelet (the kubelet's own device
manager, as in test_devicemanager) that registers once the kubelet is there, and its sockets'
mode under any umask."""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import Daemon, need
from tests.host.kubelet.harness import PLUGIN, RESOURCE, DeviceManager, PluginProcess, plugin_env
from tests.host.kubelet.test_devicemanager import daemon, gpus, manager_binary, named, nvml

__all__ = ["daemon", "gpus", "manager_binary", "named", "nvml"]  # fixtures used here

pytestmark = [pytest.mark.umockdev, pytest.mark.kubelet]

REPO = Path(__file__).resolve().parents[3]
UNIT = "hotplug-monitor-kubelet-plugin.service"


def tool(name: str) -> str:
    path = shutil.which(name)
    need(None if path else f"needs {name} (Debian package systemd)")
    assert path is not None
    return path


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    script = Path(sys.executable).parent / "hotplug-monitor"
    text = (
        (REPO / "systemd" / UNIT).read_text().replace("/usr/local/bin/hotplug-monitor", str(script))
    )
    (tmp_path / UNIT).write_text(text)
    return tmp_path


def test_the_unit_verifies_and_its_exposure_is_low(unit_dir: Path) -> None:
    verify = subprocess.run(
        [tool("systemd-analyze"), "verify", UNIT], cwd=unit_dir, capture_output=True, text=True
    )
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr
    security = subprocess.run(
        [tool("systemd-analyze"), "security", "--offline=true", UNIT],
        cwd=unit_dir,
        capture_output=True,
        text=True,
    )
    found = re.search(rf"Overall exposure level for {UNIT}: ([0-9.]+)", security.stdout)
    assert found, security.stdout + security.stderr
    assert float(found.group(1)) <= 2.0, security.stdout


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--resource", "nvidia/gpu"], "--resource 'nvidia/gpu': write GROUP=RESOURCE"),
        (["--resource", "gpu=kubernetes.io/gpu"], "the kubernetes.io and k8s.io domains"),
        (["--kubelet-dir", "relative"], "--kubelet-dir must be an absolute path"),
        (["--reconcile-interval", "0"], "--reconcile-interval must be 0.1 to 3600 seconds"),
        (["--ignore-device", "gpu0"], "is neither a PCI address"),
        (["--mig-strategy", "all"], "--mig-strategy 'all': one of none, single, mixed"),
    ],
)
def test_bad_flags_are_one_line_errors(args: list[str], says: str) -> None:
    done = subprocess.run(
        [*PLUGIN, *args], capture_output=True, text=True, timeout=60, env=plugin_env(), cwd=REPO
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("hotplug-monitor: error: ")
    assert says in done.stderr


def test_started_before_the_kubelet_it_registers_once_the_kubelet_is_there(
    manager_binary: Path, daemon: Daemon, tmp_path: Path
) -> None:
    top = Path(tempfile.mkdtemp(prefix="hm-kubelet-"))
    try:
        plugins = top / "device-plugins"
        plugin = PluginProcess(
            ["--socket", str(daemon.socket), "--kubelet-dir", str(plugins)], tmp_path / "p.log"
        )
        try:
            plugin.until_logged(f"waiting for the kubelet: {plugins / 'kubelet.sock'}")
            manager = DeviceManager(manager_binary, tmp_path / "dm.log")
            try:
                # The kubelet makes its directory at start, and removes what it finds there.
                started = manager.request(
                    "start", socket=str(plugins / "kubelet.sock"), numa_nodes=[0, 1]
                )
                assert started == {"ok": True}, started
                manager.wait(capacity=2, allocatable=2)
                plugin.until_logged(f"registered {RESOURCE} with the kubelet")
            finally:
                manager.close()
        finally:
            assert plugin.stop() == 0, plugin.log()
    finally:
        shutil.rmtree(top)


def test_without_a_daemon_it_waits_and_says_so_once(tmp_path: Path) -> None:
    plugin = PluginProcess(
        ["--socket", str(tmp_path / "none.sock"), "--kubelet-dir", str(tmp_path / "k")],
        tmp_path / "p.log",
    )
    try:
        plugin.until_logged("the hotplug-monitor daemon is not reachable")
        plugin.until_logged("waiting for the kubelet")
    finally:
        assert plugin.stop() == 0
    assert plugin.log().count("not reachable") == 1
    assert "Traceback" not in plugin.log()


def test_its_sockets_are_roots_alone_whatever_the_umask(daemon: Daemon, tmp_path: Path) -> None:
    top = Path(tempfile.mkdtemp(prefix="hm-kubelet-"))  # short: a socket path has 107 bytes
    plugins = top / "device-plugins"
    plugins.mkdir()
    kubelet = socket.socket(socket.AF_UNIX)  # a kubelet.sock to serve beside (it answers nothing)
    kubelet.bind(str(plugins / "kubelet.sock"))
    kubelet.listen()
    old = os.umask(0)  # started by hand, or by an init that leaves the umask at 000
    try:
        plugin = PluginProcess(
            ["--socket", str(daemon.socket), "--kubelet-dir", str(plugins)], tmp_path / "p.log"
        )
    finally:
        os.umask(old)
    try:
        endpoint = plugins / "hotplug-monitor-nvidia-gpu.sock"
        plugin.until_logged(f"serving {RESOURCE} on {endpoint}")
        made = endpoint.lstat()
        assert stat.S_ISSOCK(made.st_mode)
        assert (stat.S_IMODE(made.st_mode), made.st_uid) == (0o600, os.geteuid())
        assert sorted(p.name for p in plugins.iterdir()) == [endpoint.name, "kubelet.sock"]
    finally:
        assert plugin.stop() == 0, plugin.log()
        kubelet.close()
        shutil.rmtree(top)

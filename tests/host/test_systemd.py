"""systemd integration against the real pieces: unit verification and security score, a real
journald, systemd-socket-activate, a NOTIFY_SOCKET of our own, and SIGHUP reloads."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from monitor.outputs import logs
from monitor.serving.socketfile import ACL_XATTR
from monitor.sim.umockdev import Simulator
from monitor.wire.blocking import Client
from monitor.wire.errors import DaemonUnavailable
from tests.conftest import Daemon, Subscription, need, two_pci_classes
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"
JOURNALD = Path("/lib/systemd/systemd-journald")
KERNEL = ("--udev-source", "kernel", "--match-class", "0x06", "--match-class", "0xff")


def own_paths(tmp_path: Path) -> list[str]:
    """A daemon started here by hand keeps its state and CDI spec in the test's own directory,
    never in the host daemon's (tests/hermetic.py checks)."""
    return ["--state-dir", str(tmp_path / "state"), "--cdi-dir", str(tmp_path / "cdi")]


def tool(name: str) -> str:
    path = shutil.which(name)
    need(None if path else f"needs {name} (Debian package systemd)")
    assert path is not None
    return path


# --- units ---------------------------------------------------------------------------------


@pytest.fixture
def installed_units(tmp_path: Path) -> Path:
    """The units as shipped, with ExecStart pointing at this checkout's console script."""
    script = Path(sys.executable).parent / "hotplug-monitor"
    need(None if script.exists() else f"no console script next to {sys.executable}")
    for unit in ("hotplug-monitor.service", "hotplug-monitor.socket"):
        text = (UNITS / unit).read_text().replace("/usr/local/bin/hotplug-monitor", str(script))
        (tmp_path / unit).write_text(text)
    return tmp_path


def test_units_verify(installed_units: Path) -> None:
    result = subprocess.run(
        [tool("systemd-analyze"), "verify", "hotplug-monitor.service", "hotplug-monitor.socket"],
        cwd=installed_units,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr


def test_service_security_exposure_is_at_most_2_5(installed_units: Path) -> None:
    result = subprocess.run(
        [tool("systemd-analyze"), "security", "--offline=true", "hotplug-monitor.service"],
        cwd=installed_units,
        capture_output=True,
        text=True,
    )
    found = re.search(
        r"Overall exposure level for hotplug-monitor.service: ([0-9.]+)", result.stdout
    )
    assert found, result.stdout + result.stderr
    assert float(found.group(1)) <= 2.5, result.stdout


def test_sysusers_snippet_declares_the_socket_group() -> None:
    lines = [
        line.split()
        for line in (UNITS / "hotplug-monitor.sysusers").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ["g", "hotplug-monitor", "-"] in lines
    assert ["g", "hotplug-monitor-read", "-"] in lines
    assert "SocketGroup=hotplug-monitor" in (UNITS / "hotplug-monitor.socket").read_text()


def test_catalog_parses_and_explains_every_message_id(tmp_path: Path) -> None:
    catalog_dir = tmp_path / "usr/lib/systemd/catalog"
    catalog_dir.mkdir(parents=True)
    shutil.copy(UNITS / "hotplug-monitor.catalog", catalog_dir)
    journalctl = tool("journalctl")
    update = subprocess.run(
        [journalctl, f"--root={tmp_path}", "--update-catalog"], capture_output=True, text=True
    )
    assert update.returncode == 0 and update.stderr == "", update.stderr
    listed = subprocess.run(
        [journalctl, f"--root={tmp_path}", "--list-catalog"], capture_output=True, text=True
    ).stdout
    for message_id in logs.MESSAGE_IDS.values():
        assert f"{message_id} hotplug-monitor: " in listed


# --- journald ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def journald() -> Iterator[None]:
    """A journald to log to: the host's if it runs, else one started standalone for the tests."""
    need(None if os.geteuid() == 0 else "needs root to run systemd-journald")
    need(None if JOURNALD.exists() else "needs systemd-journald (Debian package systemd)")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        probe.connect(logs.JOURNAL_SOCKET)
        running = True
    except OSError:
        running = False
    finally:
        probe.close()
    if running:
        yield
        return
    process = subprocess.Popen(
        [str(JOURNALD)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_until(
        lambda: os.path.exists(logs.JOURNAL_SOCKET), what="systemd-journald to start", interval=0.05
    )
    try:
        yield
    finally:
        process.terminate()
        process.wait(timeout=10)
        # It leaves its sockets behind; without them nothing mistakes journald for running.
        for name in ("socket", "stdout", "dev-log", "io.systemd.journal"):
            Path("/run/systemd/journal", name).unlink(missing_ok=True)


def journal_entries(
    message_id: str, pid: int, count: int, timeout: float = 10
) -> list[dict[str, Any]]:
    def entries() -> list[dict[str, Any]]:
        out = subprocess.run(
            ["journalctl", "-o", "json", "--no-pager", f"MESSAGE_ID={message_id}", f"_PID={pid}"],
            capture_output=True,
            text=True,
        ).stdout
        found = [json.loads(line) for line in out.splitlines() if line.strip()]
        return found if len(found) >= count else []

    return wait_until(entries, timeout, f"{count} journal entries {message_id}", interval=0.1)


def test_health_transitions_are_structured_journal_entries(
    journald: None, sim: Simulator, start_daemon: Callable[..., Daemon]
) -> None:
    sim.add("nvidia-h100", "0000:3b:00.0", 0)
    sim.add("intel-arc", "0000:9a:00.0", 0)
    env = {k: v for k, v in sim.daemon_env().items() if k != "JOURNAL_STREAM"}
    daemon = start_daemon("--udev-source", "udev", "--log-target", "auto", env=env)
    sim.pci_error("0000:3b:00.0", "FAILED_RECOVERY")
    sim.pci_error("0000:3b:00.0", "SUCCESSFUL_RECOVERY")
    sim.wedge("0000:9a:00.0", "rebind")
    pid = daemon.process.pid

    [lost] = journal_entries(logs.MESSAGE_IDS["lost"], pid, 1)
    assert lost["PRIORITY"] == "2"  # crit
    assert lost["DEVICE_ID"] == lost["PCI_BUS_ID"] == "0000:3b:00.0"
    assert (lost["VENDOR"], lost["DEVICE_NAME"], lost["HEALTH"]) == (
        "nvidia",
        "H100 SXM5 80GB",
        "unhealthy",
    )
    assert lost["RECOVERY_ACTION"] == "reset or replace the device"
    assert "recovery failed" in lost["MESSAGE"] and lost["SYSLOG_IDENTIFIER"] == "hotplug-monitor"

    [recovered] = journal_entries(logs.MESSAGE_IDS["recovered"], pid, 1)
    assert recovered["PRIORITY"] == "5"  # notice
    assert (recovered["DEVICE_ID"], recovered["HEALTH"]) == ("0000:3b:00.0", "healthy")
    assert "RECOVERY_ACTION" not in recovered

    [wedged] = journal_entries(logs.MESSAGE_IDS["unhealthy"], pid, 1)
    assert wedged["PRIORITY"] == "3"  # err
    assert (wedged["DEVICE_ID"], wedged["VENDOR"], wedged["DEVICE_NAME"]) == (
        "0000:9a:00.0",
        "intel",
        "Arc A770",
    )
    assert wedged["RECOVERY_ACTION"] == "rebind" and wedged["HEALTH"] == "unhealthy"
    # With the journal as target, nothing goes to stderr.
    assert daemon.log() == ""


def test_without_journald_stderr_lines_carry_priority_prefixes(
    sim: Simulator, start_daemon: Callable[..., Daemon]
) -> None:
    sim.add("nvidia-h100", "0000:3b:00.0", 0)
    daemon = start_daemon("--udev-source", "udev", env=sim.daemon_env())
    sim.pci_error("0000:3b:00.0", "FAILED_RECOVERY")
    wait_until(lambda: "is lost" in daemon.log(), what="'is lost' logged", interval=0.05)
    lines = daemon.log().splitlines()
    assert any(line.startswith("<6>INFO ") for line in lines)
    assert any(
        line.startswith("<2>CRITICAL monitor.engine.reducer_task: 0000:3b:00.0") for line in lines
    )


# --- socket activation ---------------------------------------------------------------------


def test_socket_activation_answers_early_clients_and_keeps_the_socket(tmp_path: Path) -> None:
    path = tmp_path / "activated.sock"
    log = (tmp_path / "daemon.log").open("wb")
    activator = subprocess.Popen(
        [tool("systemd-socket-activate"), "-l", str(path), sys.executable, "-m", "monitor",
         "serve", "--log-target", "stderr", *own_paths(tmp_path), *KERNEL],
        stderr=log,
    )  # fmt: skip
    try:
        wait_until(path.exists, what="systemd-socket-activate to listen")
        # The daemon starts only now, on this first connection: the client is early.
        with Client(path) as client:
            result = client.call("fingerprint")
        assert "groups" in result["snapshot"]
        activator.send_signal(signal.SIGTERM)
        assert activator.wait(timeout=5) == 0
        assert path.exists()  # systemd's socket, not ours to remove
        assert "serving on the socket systemd passed us" in (tmp_path / "daemon.log").read_text()
    finally:
        if activator.poll() is None:
            activator.kill()
            activator.wait()
        log.close()


def test_the_read_only_group_is_let_in_to_the_socket_systemd_passed(tmp_path: Path) -> None:
    """systemd's socket units have no ACLs: the daemon adds the read-only group's entry."""
    path = tmp_path / "activated.sock"
    log = (tmp_path / "daemon.log").open("wb")
    activator = subprocess.Popen(
        [tool("systemd-socket-activate"), "-l", str(path), sys.executable, "-m", "monitor",
         "serve", "--log-target", "stderr", "--state-dir", str(tmp_path / "state"), "--no-cdi",
         "--no-nvml", "--read-group", "4343", *KERNEL],
        stderr=log,
    )  # fmt: skip
    try:
        wait_until(path.exists, what="systemd-socket-activate to listen")
        with Client(path) as client:
            client.call("fingerprint")
        acl = os.getxattr(path, ACL_XATTR)
        assert struct.pack("<HHI", 0x08, 6, 4343) in acl, acl.hex()  # group 4343: rw
    finally:
        activator.kill()
        activator.wait()
        log.close()


# --- sd_notify and the watchdog ------------------------------------------------------------


class NotifySocket:
    """A NOTIFY_SOCKET of the test's own, keeping every datagram the daemon sends and when."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[tuple[float, str]] = []

    def receive(self, timeout: float) -> list[tuple[float, str]]:
        """What arrives within ``timeout`` seconds."""
        got = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            got.append((time.monotonic(), data.decode()))
        self.messages += got
        return got

    def wait_for(self, text: str, timeout: float = 20, after: int = 0) -> None:
        """Until a message containing ``text`` has arrived (now, or before but not among the
        first ``after``)."""

        def arrived() -> bool:
            if any(text in m for _, m in self.messages[after:]):
                return True
            self.receive(0.1)
            return False

        wait_until(arrived, timeout, lambda: f"{text!r}; got {self.messages}", interval=0)


def test_ready_status_watchdog_and_stopping(tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "200000"}
    sock = tmp_path / "monitor.sock"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "monitor", "serve", "--socket", str(sock), "--log-target", "stderr",
         *own_paths(tmp_path), *KERNEL],
        env=env,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        notify.wait_for("READY=1")
        # READY=1 only once the first snapshot is complete and the socket accepts.
        with Client(sock) as client:
            devices = client.call("fingerprint")["snapshot"]["groups"]
        assert devices, "READY=1 came before the first enumeration"
        messages = [m for _, m in notify.messages]
        assert "WATCHDOG=1" not in messages[: messages.index("READY=1")]
        notify.wait_for("STATUS=")
        status = next(m for _, m in notify.messages if m.startswith("STATUS="))
        assert re.fullmatch(
            r"STATUS=(1 device|\d+ devices), \d+ unhealthy, 0 subscribers, 0 reservations", status
        )
        with Client(sock) as client:
            client.call("subscribe")
            notify.wait_for(", 1 subscriber, ")

        # WatchdogSec of 0.2 s: pings keep coming, from the event loop (their interval, and
        # none while the loop stalls: tests/inprocess/test_timers.py).
        for _ in range(3):
            notify.wait_for("WATCHDOG=1", after=len(notify.messages))
        daemon.send_signal(signal.SIGSTOP)  # the loop cannot run: no pings
        try:
            stalled = [m for _, m in notify.receive(1.0) if m == "WATCHDOG=1"]
        finally:
            daemon.send_signal(signal.SIGCONT)
        assert len(stalled) <= 1  # at most one already on its way
        assert [m for _, m in notify.receive(0.5) if m == "WATCHDOG=1"]  # and back

        daemon.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1")
        assert daemon.wait(timeout=5) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


# --- SIGHUP ----------------------------------------------------------------------------------


def test_sighup_reloads_a_good_config_and_keeps_the_old_one_on_a_bad(
    tmp_path: Path,
    start_daemon: Callable[..., Daemon],
    subscribe: Callable[[Daemon], Subscription],
) -> None:
    classes, first, second = two_pci_classes()
    config = tmp_path / "config.toml"
    config.write_text(f'udev_source = "kernel"\nmatch_class = ["{first}"]\n')
    daemon = start_daemon("--config", str(config))
    sub = subscribe(daemon)
    assert set(sub.mirror.devices()) == {a for a, c in classes.items() if c == first}

    config.write_text(f'udev_source = "kernel"\nmatch_class = ["{second}"]\nlog_level = "debug"\n')
    daemon.process.send_signal(signal.SIGHUP)
    mirror = sub.until(lambda m: set(m.devices()) == {a for a, c in classes.items() if c == second})
    assert mirror.generation == sub.notifications[-1]["generation"]  # by patch: still subscribed

    config.write_text('match_class = ["not hex"]\n')
    daemon.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload refused" in daemon.log(), what=lambda: f"a refusal:\n{daemon.log()}")
    assert "invalid PCI class 'not hex'" in daemon.log()
    assert set(daemon.fingerprint()["snapshot"]["groups"]) == set(mirror.snapshot["groups"])
    assert daemon.process.poll() is None
    try:
        sub.client.call("fingerprint")  # the subscriber's connection is still open
    except DaemonUnavailable:
        pytest.fail("the reload dropped a subscriber")

"""Start, stop, sockets and configuration, as an operator meets them."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from monitor.wire.errors import DaemonUnavailable
from tests.conftest import Daemon, hotplug_monitor, need, two_pci_classes

KERNEL = ("--udev-source", "kernel", "--match-class", "0x06", "--match-class", "0xff")


def own(tmp_path: Path) -> list[str]:
    """A state directory and no CDI spec of this test's own, so that whichever check comes
    first, none is the host daemon's (tests/hermetic.py checks); the socket is given apart."""
    return ["--state-dir", str(tmp_path / "own-state"), "--no-cdi", "--no-nvml"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_it_closing_clients_and_removing_the_socket(
    start_daemon: Callable[..., Daemon], signum: int
) -> None:
    daemon = start_daemon(*KERNEL)
    clients = [daemon.client() for _ in range(20)]
    for client in clients:
        client.call("subscribe")
    daemon.process.send_signal(signum)
    daemon.process.wait(timeout=10)  # how fast: tests/bench, scenario 9
    assert daemon.process.returncode == 0, daemon.log()
    assert not daemon.socket.exists()
    for client in clients:
        with pytest.raises(DaemonUnavailable, match="closed the connection"):
            next(client.messages())
        client.close()
    assert "Traceback" not in daemon.log()


def test_a_stale_socket_file_is_replaced(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "monitor.sock"))
    stale.close()  # the file stays, nobody listens: what a crash leaves behind
    daemon = start_daemon(*KERNEL)
    assert "groups" in daemon.fingerprint()["snapshot"]
    assert "replacing stale socket" in daemon.log()


def test_a_live_socket_is_refused_and_left_alone(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    first = start_daemon(*KERNEL)
    second = hotplug_monitor("serve", "--socket", str(first.socket), *own(tmp_path), *KERNEL)
    assert second.returncode == 1
    assert second.stderr.strip().endswith(
        f"error: another hotplug-monitor is already serving on {first.socket}"
    )
    assert "Traceback" not in second.stderr
    assert "groups" in first.fingerprint()["snapshot"]


def test_a_socket_path_that_is_not_a_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("important")
    result = hotplug_monitor("serve", "--socket", str(path), *own(tmp_path), *KERNEL)
    assert result.returncode == 1 and "is not a socket" in result.stderr
    assert path.read_text() == "important"


@pytest.mark.parametrize(
    "command",
    [["devices"], ["watch"], ["reserve", "0000:3b:00.0"], ["release", "x"], ["leases"]],
)
def test_clients_say_in_one_line_that_no_daemon_runs(command: list[str], tmp_path: Path) -> None:
    result = hotplug_monitor(command[0], "--socket", str(tmp_path / "none.sock"), *command[1:])
    assert result.returncode == 1
    assert result.stderr == (
        f"hotplug-monitor: error: no daemon is running: {tmp_path / 'none.sock'} does not exist\n"
    )


def test_help_explains_every_command() -> None:
    result = hotplug_monitor("--help")
    assert result.returncode == 0
    for command in ("serve", "devices", "watch", "reserve", "release", "leases", "demo"):
        assert command in result.stdout
    serve = hotplug_monitor("serve", "--help").stdout
    for flag in (
        "--socket",
        "--state-dir",
        "--config",
        "--udev-source",
        "--match-class",
        "--no-nvml",
        "--group",
        "--cdi-dir",
        "--no-cdi",
    ):
        assert flag in serve
    reserve = hotplug_monitor("reserve", "--help").stdout
    for flag in ("--holder-pid", "--cdi", "--docker-args", "--env", "--json"):
        assert flag in reserve


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("match_class = [", "is not valid TOML"),
        ('colour = "blue"', "unknown setting 'colour'"),
        (
            'match_class = "03"',
            'config.toml: match_class must be a list of PCI class prefixes such as "0x03", '
            "not a string",
        ),
        (
            'match_class = ["0x03", "0xZZ"]',
            "config.toml: match_class item 1 ('0xZZ'): invalid PCI class '0xZZ'",
        ),
        (
            'udev_source = "carrier-pigeon"',
            "config.toml: udev_source must be one of auto, udev, kernel",
        ),
        ("netlink_buffer = 10", "config.toml: netlink_buffer must be at least 65536 bytes"),
        (
            'xid_ignore = [79, "x"]',
            "config.toml: xid_ignore item 1 ('x'): must be an XID (a whole number), not a string",
        ),
        ("xid_ignore = [79]\nxid_fatal = [79, 13]", "XIDs both ignored and fatal: 79"),
        ("nvml_timeout = 0", "config.toml: nvml_timeout must be a positive number of seconds"),
        ('group = "no-such-group-here"', "no group named 'no-such-group-here' on this host"),
        ("cdi_dir = 3", 'config.toml: cdi_dir must be a path, or "" for none, not an integer'),
    ],
)
def test_bad_config_files_are_one_clear_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text + "\n")
    here = ["--socket", str(tmp_path / "s.sock"), *own(tmp_path)]
    result = hotplug_monitor("serve", "--config", str(path), *here)
    assert result.returncode == 1
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_missing_config_file_and_bad_flags(tmp_path: Path) -> None:
    here = ["--socket", str(tmp_path / "s.sock"), *own(tmp_path)]
    missing = hotplug_monitor("serve", "--config", str(tmp_path / "nope.toml"), *here)
    assert missing.returncode == 1 and "cannot read config file" in missing.stderr
    bad_class = hotplug_monitor("serve", "--match-class", "display", *here)
    assert bad_class.returncode == 2 and "invalid PCI class 'display'" in bad_class.stderr
    bad_xid = hotplug_monitor("serve", "--xid-fatal", "-3", *here)
    assert bad_xid.returncode == 2
    assert bad_xid.stderr.endswith(
        "hotplug-monitor serve: error: argument --xid-fatal: an XID is a whole number from 1 to "
        "65535, not -3\n"
    )
    bad_buffer = hotplug_monitor("serve", "--netlink-buffer", "10", *here)
    assert bad_buffer.returncode == 1
    assert bad_buffer.stderr == (
        "hotplug-monitor: error: --netlink-buffer must be at least 65536 bytes\n"
    )


def test_config_file_applies_and_flags_win(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    classes, first, second = two_pci_classes()
    path = tmp_path / "config.toml"
    path.write_text(f'udev_source = "kernel"\nmatch_class = ["0x{first}"]\n')
    from_file = start_daemon("--config", str(path))
    assert _ids(from_file) == {a for a, c in classes.items() if c == first}
    from_file.stop()
    overridden = start_daemon("--config", str(path), "--match-class", second)
    assert _ids(overridden) == {a for a, c in classes.items() if c == second}


def _ids(daemon: Daemon) -> set[str]:
    groups = daemon.fingerprint()["snapshot"]["groups"]
    return {device_id for group in groups.values() for device_id in group["devices"]}


def test_python_dash_m_and_the_console_script_are_the_same_program() -> None:
    script = Path(sys.executable).parent / "hotplug-monitor"
    need(None if script.exists() else f"no console script next to {sys.executable}")
    via_script = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True)
    assert via_script.stdout == hotplug_monitor("--help").stdout

"""The operator's first hour, second pass (issue 30): no tracebacks, one error style
(``hotplug-monitor: error: <lower case>``, exit 2 for usage and 1 for refusals), and hints
that name the setting and the fix."""

from __future__ import annotations

import grp
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from monitor.daemon import identities
from tests.conftest import GROUP, MALLORY, Daemon, cli_as, hotplug_monitor


def one_error_line(done: subprocess.CompletedProcess[str], status: int = 1) -> str:
    assert done.returncode == status and "Traceback" not in done.stderr, done
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("hotplug-monitor: error: "), done.stderr
    return lines[-1]


def test_a_config_that_is_a_directory_is_one_line_like_a_missing_file(tmp_path: Path) -> None:
    line = one_error_line(hotplug_monitor("serve", "--config", str(tmp_path)))
    assert line == f"hotplug-monitor: error: config file: {tmp_path} is not a regular file"


def test_a_full_stdout_is_one_line_and_a_closed_one_a_silent_exit() -> None:
    command = [sys.executable, "-m", "monitor", "explain-xid", "79"]
    with open("/dev/full", "w") as full:
        done = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr == (
        "hotplug-monitor: error: cannot write the output: No space left on device\n"
    )
    read, write = os.pipe()
    os.close(read)  # `| head` that has read all it wanted
    try:
        closed = subprocess.run(command, stdout=write, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write)
    assert (closed.returncode, closed.stderr) == (0, "")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["release", "--all"], "--all releases every lease of one owner: give --owner NAME"),
        (["release"], "give device IDs, --reservation ID, or --owner NAME --all: one of them"),
        (["stats", "--interval", "0"], "argument --interval: must be from 1 to 3600 seconds"),
    ],
)
def test_usage_errors_exit_2_with_the_commands_usage(args: list[str], says: str) -> None:
    done = hotplug_monitor(*args)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done
    assert done.stderr.startswith(f"usage: hotplug-monitor {args[0]}"), done.stderr
    assert f"hotplug-monitor {args[0]}: error: {says}" in done.stderr


def test_the_daemons_refusals_are_errors_in_the_same_style() -> None:
    from monitor.cli import daemon_message

    assert daemon_message("Already reserved: 0000:1b:00.0 by R1.") == (
        "already reserved: 0000:1b:00.0 by R1"
    )
    assert daemon_message("CDI is off.") == "CDI is off"  # an acronym keeps its case


def test_a_directory_others_can_write_names_the_setting_and_the_fix(tmp_path: Path) -> None:
    world = tmp_path / "world"
    world.mkdir()
    world.chmod(0o1777)
    base = ["serve", "--no-nvml", "--no-kmsg", "--udev-source", "kernel"]
    for flag, args in [
        ("--state-dir", ["--socket", str(tmp_path / "s.sock"), "--no-cdi"]),
        ("--cdi-dir", ["--socket", str(tmp_path / "s.sock"), "--state-dir", str(tmp_path / "st")]),
        ("--socket", ["--state-dir", str(tmp_path / "st"), "--no-cdi"]),
    ]:
        where = str(world / "s.sock") if flag == "--socket" else str(world)
        line = one_error_line(hotplug_monitor(*base, *args, flag, where))
        assert line.startswith(f"hotplug-monitor: error: {flag} {where}: refusing {world}: "), line
        assert "others can write" in line and f"give {flag} a directory that only root" in line


def test_an_outsider_is_told_which_group_may_connect_and_how_to_join(
    start_daemon: Callable[..., Daemon], shared_socket: Path
) -> None:
    start_daemon("--group", str(GROUP), socket=shared_socket)
    status, _, err = cli_as(MALLORY, [MALLORY], ["devices", "--socket", str(shared_socket)])
    assert status == 1
    try:
        group = grp.getgrgid(GROUP).gr_name
    except KeyError:
        group = str(GROUP)
    assert err == (
        f"hotplug-monitor: error: permission denied connecting to {shared_socket}: only root and "
        f"the group {group} may connect (sudo usermod -aG {group} {MALLORY}, then log in again)\n"
    )


def test_a_users_daemon_gives_its_socket_to_the_default_group_only_if_a_member(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    found = grp.struct_group(("hotplug-monitor", "x", 4343, []))
    monkeypatch.setattr(grp, "getgrnam", lambda name: found)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(os, "getegid", lambda: 1000)
    monkeypatch.setattr(os, "getgroups", lambda: [1000])
    assert identities.resolve_group(None) is None  # the user's own: the socket is 0600
    assert identities.resolve_group("hotplug-monitor") == 4343  # asked for: tried, and said
    monkeypatch.setattr(os, "getgroups", lambda: [1000, 4343])
    assert identities.resolve_group(None) == 4343


def test_a_user_naming_a_group_of_others_is_told_which_and_the_flag(shared_tmp: Path) -> None:
    mine = shared_tmp / "mallory"
    mine.mkdir()
    os.chown(mine, MALLORY, MALLORY)
    argv = ["serve", "--socket", str(mine / "s.sock"), "--state-dir", str(mine / "state")]
    argv += ["--no-nvml", "--udev-source", "kernel", "--log-target", "stderr"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(mine)}
    status, _, err = cli_as(MALLORY, [MALLORY], [*argv, "--group", str(GROUP)], env=env)
    assert status == 1, err
    assert (
        err.strip()
        .splitlines()[-1]
        .endswith(
            f"cannot give it to the group {GROUP}, which uid {MALLORY} is not in; "
            "give --group a group of yours, or run as root"
        )
    ), err


def test_no_matching_device_says_which_classes_and_how_to_change_them(
    start_daemon: Callable[..., Daemon],
) -> None:
    present = {p.read_text()[2:4] for p in Path("/sys/bus/pci/devices").glob("*/class")}
    unused = next(f"{c:02x}" for c in range(0x13) if f"{c:02x}" not in present)
    daemon = start_daemon("--match-class", f"0x{unused}")  # a class no device here has
    done = daemon.cli("devices")
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        "no matching devices: by default the daemon follows the PCI classes 0x03 (display "
        "controller), 0x12 (processing accelerator); to follow others, run it with serve "
        "--match-class HEX (repeatable; match_class in its config file)\n"
    )

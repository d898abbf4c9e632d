"""What a new operator meets in the first hour, through the real command line against a real
daemon: every mistake is one line that says what to do, and every format works as it is."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from monitor.core.pci import class_phrase
from monitor.sim.umockdev import Simulator
from tests.conftest import Daemon, hotplug_monitor, need
from tests.sysfs import reservable
from tests.waiting import wait_until


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 1 and "Traceback" not in done.stderr, done
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("hotplug-monitor: error: "), done.stderr
    return lines[-1]


def test_serve_says_in_one_line_why_it_cannot_listen(tmp_path: Path) -> None:
    here = ["--state-dir", str(tmp_path / "state"), "--no-nvml", "--no-cdi"]
    read_only = tmp_path / "ro"
    read_only.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,mode=0755", "tmpfs", str(read_only)]
    )
    need(None if mounted.returncode == 0 else "needs root to mount a read-only tmpfs")
    try:
        for socket, says in [
            (read_only / "x.sock", "Read-only file system"),
            (Path("/proc/x.sock"), "cannot listen on /proc/x.sock"),
            (tmp_path / ("d" * 120) / "x.sock", "longer than the 107 bytes"),
            (tmp_path / "state" / "a-file" / "x.sock", "a-file is not a directory"),
        ]:
            if socket.parent.name == "a-file":
                socket.parent.parent.mkdir(exist_ok=True)
                socket.parent.write_text("")
            line = one_error_line(hotplug_monitor("serve", "--socket", str(socket), *here))
            assert says in line, line
    finally:
        subprocess.run(["umount", str(read_only)], check=True)


def test_a_missing_socket_directory_is_made_and_the_log_says_so(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    deep = tmp_path / "a" / "b" / "c" / "monitor.sock"
    daemon = start_daemon(socket=deep)
    assert f"created the socket directory {deep.parent}" in daemon.log()
    assert (deep.parent.stat().st_mode & 0o777) == 0o755


def test_a_person_watching_sees_the_log_and_one_line_that_says_it_is_up(tmp_path: Path) -> None:
    """With stderr a terminal, the log is there, even where a journal would take it."""
    sock = tmp_path / "s.sock"
    leader, follower = pty.openpty()
    daemon = subprocess.Popen(
        [sys.executable, "-m", "monitor", "serve", "--socket", str(sock), "--no-nvml",
         "--no-cdi", "--no-kmsg", "--udev-source", "kernel",
         "--state-dir", str(tmp_path / "state")],
        stderr=follower,
        env={**os.environ, "JOURNAL_STREAM": "8:1234"},  # what systemd sets: a journal exists
    )  # fmt: skip
    os.close(follower)
    seen = b""
    try:
        deadline = time.monotonic() + 20
        while b"serving" not in seen and time.monotonic() < deadline:
            if select.select([leader], [], [], 0.5)[0]:
                seen += os.read(leader, 4096)
    finally:
        daemon.terminate()
        daemon.wait()
        os.close(leader)
    text = seen.decode()
    sources = "uevents from the kernel, NVML off, kernel log off, no CDI spec"
    assert f"serving 0 devices on {sock} ({sources})" in text
    # the journal's <N> priority prefixes are for readers of a stream, not for a person
    lines = text.splitlines()
    assert any(line.startswith("INFO monitor.daemon.app: serving") for line in lines), lines
    assert not any(line.startswith("<") for line in lines), lines


def test_udev_source_udev_without_udevd_warns_and_says_what_auto_would_do(
    start_daemon: Callable[..., Daemon],
) -> None:
    need(None if not Path("/run/udev/control").exists() else "udevd runs on this host")
    daemon = start_daemon("--udev-source", "udev")
    assert "udevd does not seem to run" in daemon.log()
    assert "--udev-source auto would listen to the kernel's" in daemon.log()


def test_usage_errors_show_the_commands_own_usage_and_version_is_there() -> None:
    for args, usage in [
        (["serve", "--bogus"], "usage: hotplug-monitor serve"),
        (["devices", "--jsn"], "usage: hotplug-monitor devices"),
    ]:
        done = hotplug_monitor(*args)
        assert done.returncode == 2 and done.stderr.startswith(usage), done.stderr
        assert f"unrecognized arguments: {args[1]}" in done.stderr
    script = Path(sys.executable).with_name("hotplug-monitor")
    for command in ([sys.executable, "-m", "monitor"], [str(script)]):
        version = subprocess.run([*command, "--version"], capture_output=True, text=True)
        assert version.stdout == "hotplug-monitor 0.1.0\n", version


def test_an_option_before_any_command_is_named() -> None:
    done = hotplug_monitor("--verbose")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == (
        "hotplug-monitor: error: unrecognized arguments: --verbose (and no COMMAND given)"
    )
    nothing = hotplug_monitor()  # no option at all: the missing command is what is said
    assert nothing.stderr.splitlines()[-1] == (
        "hotplug-monitor: error: the following arguments are required: COMMAND"
    )


@pytest.mark.parametrize("speed", ["0", "-1", "nan", "inf", "fast"])
def test_a_demo_speed_that_is_no_positive_number_is_one_line(speed: str) -> None:
    done = hotplug_monitor("demo", "--speed", speed)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"hotplug-monitor demo: error: argument --speed: a speed is a positive number (2, 0.5), "
        f"not {speed!r}"
    )


def test_releasing_a_typo_is_an_error_and_not_reserved_is_said_plainly(
    start_daemon: Callable[..., Daemon],
) -> None:
    devices, flags = reservable()
    daemon = start_daemon(*flags)
    for wrong in ("0000:99:00.0", "not-an-id"):
        done = daemon.cli("release", wrong)
        assert done.returncode == 1
        assert done.stderr == f"hotplug-monitor: error: no such device on this host: {wrong}\n"
    done = daemon.cli("release", devices[0])
    assert (done.returncode, done.stdout) == (0, f"{devices[0]} was not reserved\n")


def test_a_device_present_but_not_followed_says_which_class_would_follow_it(
    start_daemon: Callable[..., Daemon],
) -> None:
    devices, _ = reservable()
    classes = {d: (Path("/sys/bus/pci/devices") / d / "class").read_text()[2:4] for d in devices}
    followed = classes[devices[0]]
    other = next((d for d in devices if classes[d] != followed), None)
    need(None if other else "needs PCI devices of two base classes with drivers")
    assert other is not None
    daemon = start_daemon("--match-class", followed)
    done = daemon.cli("reserve", other)
    assert done.returncode == 1
    kind = class_phrase(int(classes[other], 16) << 16)
    assert f"{other} is not followed: it is {kind} (class" in done.stderr
    assert f"which serve --match-class 0x{classes[other]} would follow" in done.stderr


def test_watch_shows_reservations_and_releases(start_daemon: Callable[..., Daemon]) -> None:
    devices, flags = reservable()
    daemon = start_daemon(*flags)
    command = [sys.executable, "-m", "monitor", "watch", "--socket", str(daemon.socket)]
    watcher = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert watcher.stdout is not None
        first = watcher.stdout.readline()  # the devices as they are, one line each
        generation = first.split("]")[0]
        lease = json.loads(daemon.cli("reserve", "--json", devices[0]).stdout)["reservation_id"]
        while (reserved := watcher.stdout.readline()).startswith(generation):
            pass
        assert f"> {devices[0]} " in reserved and reserved.endswith(f"reserved by {lease}\n")
        daemon.cli("release", devices[0])
        released = watcher.stdout.readline()
        assert f"< {devices[0]} " in released and released.endswith(f"released by {lease}\n")
    finally:
        watcher.terminate()
        watcher.wait()


def test_the_log_tells_who_had_which_device_when(start_daemon: Callable[..., Daemon]) -> None:
    devices, flags = reservable()
    daemon = start_daemon(*flags)
    assert f"{devices[0]} (" in daemon.log() and "is here, healthy" in daemon.log()
    holder = subprocess.Popen(["sleep", "60"])
    try:
        with daemon.client() as client:
            kept = client.call("reserve", {"device_ids": [devices[0]]})["reservation_id"]
            ends = client.call("reserve", {"device_ids": [devices[1]], "holder_pid": holder.pid})[
                "reservation_id"
            ]
            client.call("release", {"reservation_id": kept})
    finally:
        holder.kill()
        holder.wait()
    wait_until(
        lambda: "ends: its holder process" in daemon.log(),
        5,
        lambda: f"the lease's end logged:\n{daemon.log()}",
    )
    log = daemon.log()
    assert f"reservation {kept} granted to uid 0 (pid {os.getpid()}): {devices[0]}" in log
    assert f"reservation {kept} released by uid 0 (pid {os.getpid()}): {devices[0]}" in log
    assert f"reservation {ends} ends: its holder process {holder.pid} exited" in log


@pytest.mark.umockdev
def test_ctrl_c_in_the_demo_ends_it_without_a_traceback(sim: Simulator) -> None:
    # A terminal's job takes SIGINT; a suite run in the background (nohup, a script's &) has it
    # ignored, which the demo would inherit. A handler here is reset to the default in the child.
    ignored = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        demo = subprocess.Popen(
            [sys.executable, "-m", "monitor", "demo"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group, as a terminal's foreground job
        )
    finally:
        signal.signal(signal.SIGINT, ignored)
    assert demo.stdout is not None
    sock = ""
    while "demo: watching changes" not in (line := demo.stdout.readline()):
        sock = line.rpartition("; socket ")[2].strip() if "; socket " in line else sock
    os.killpg(demo.pid, signal.SIGINT)  # what Ctrl-C sends: to the whole group
    out, err = demo.communicate(timeout=20)
    assert demo.returncode == 130, err
    assert "Traceback" not in err and "Traceback" not in out
    # Its daemon and watcher (process groups of their own) were stopped with it.
    assert sock.endswith("demo.sock")
    assert not [
        p.info for p in psutil.process_iter(["cmdline"]) if sock in (p.info["cmdline"] or [])
    ]

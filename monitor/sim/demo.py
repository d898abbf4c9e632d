"""``hotplug-monitor demo``: the daemon on simulated GPUs, and a story told while watching it.

Hotplug, a PCI error and its recovery, a wedge and a rebind, an unplug and a replug, an XID
through NVML's stand-in, then what a workload sees: a reservation, another user refused it, a
release, and the CDI devices a container engine would be given.
"""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from monitor.sim.nvml import FakeGpu, FakeNvml, build_library
from monitor.sim.umockdev import Simulator, umockdev_missing
from monitor.wire.blocking import Client
from monitor.wire.errors import DaemonUnavailable
from monitor.wire.mirror import Mirror

GPUS = (
    ("nvidia-h100", "0000:1b:00.0", 0),
    ("nvidia-h100", "0000:3b:00.0", 0),
    ("amd-mi300x", "0000:5b:00.0", 1),
    ("intel-arc", "0000:9a:00.0", 1),
)
NVML_GPUS = ("0000:1b:00.0", "0000:3b:00.0", "0000:bb:00.0")  # NVML knows the hot-added one

Step = tuple[str, tuple[tuple[Any, ...], ...]]
HARDWARE: tuple[Step, ...] = (
    ("a GPU is hot-added", (("add", "nvidia-h100", "0000:bb:00.0", 1),)),
    ("its PCI link reports an error", (("pci_error", "0000:bb:00.0", "BEGIN_RECOVERY"),)),
    ("the kernel recovers it", (("pci_error", "0000:bb:00.0", "SUCCESSFUL_RECOVERY"),)),
    ("the Intel GPU's driver declares it wedged", (("wedge", "0000:9a:00.0", "rebind"),)),
    ("the driver is rebound", (("unbind", "0000:9a:00.0"), ("bind", "0000:9a:00.0"))),
    ("the AMD GPU is unplugged", (("remove", "0000:5b:00.0"),)),
    ("and plugged back in", (("add", "amd-mi300x", "0000:5b:00.0", 1),)),
)
NVML: tuple[Step, ...] = (
    (
        "NVML reports XID 79 for 0000:3b:00.0: it fell off the bus",
        (("nvml.xid", "0000:3b:00.0", 79),),
    ),
    (
        "the GPU is reset and its driver reloaded",
        (("unbind", "0000:3b:00.0"), ("bind", "0000:3b:00.0")),
    ),
)
WORKLOAD = ("0000:1b:00.0", "0000:3b:00.0")


def missing() -> str | None:
    """What the demo needs and this host lacks, in one line; None when it can run."""
    return umockdev_missing()


def uuid(address: str) -> str:
    return f"GPU-5d1e3a4b-0000-4000-8000-{address.replace(':', '').replace('.', ''):0>12}"


def _nvml(directory: Path) -> tuple[FakeNvml | None, str]:
    """The NVML stand-in for the demo, or why it cannot be built here."""
    try:
        library = build_library(directory / "lib")
    except (OSError, subprocess.CalledProcessError):
        pip = Path(sys.executable).parent / "pip"
        return None, f"its stand-in needs gcc and NVIDIA's nvml.h: {pip} install nvidia-nvml-dev"
    gpus = [FakeGpu(bus_id=a, uuid=uuid(a), minor=i) for i, a in enumerate(NVML_GPUS)]
    return FakeNvml(directory / "scenario", library, gpus), ""


class Terminal:
    """The one writer of the demo's output: its own lines, the commands' and the watcher's, each
    written whole under one lock, so that no two run together on a line.

    While a command runs, the watcher's lines are held back (``command``), so that a change is
    told after the command's output that made it; ``settle`` waits until the watcher has told
    every change up to the daemon's generation, so that a step's changes come before the next
    step's title."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: list[str] | None = None
        self._watched = threading.Condition(self._lock)
        self.generation = -1  # the last generation the watcher told of

    def line(self, text: str = "", *, err: bool = False) -> None:
        with self._lock:
            self._write(text, err)

    def _write(self, text: str, err: bool) -> None:
        stream = sys.stderr if err else sys.stdout
        stream.write(text + "\n")
        stream.flush()

    def watched(self, text: str) -> None:
        """A line from ``watch``: ``[GENERATION] what changed``, or its first snapshot's."""
        with self._lock:
            if self._held is not None:
                self._held.append(text)
            else:
                self._write(text, False)
            match = re.match(r"\[(\d+)\]", text)
            if match:
                self.generation = max(self.generation, int(match.group(1)))
                self._watched.notify_all()

    def command(self, shown: str, argv: list[str]) -> None:
        """Run a command (``shown`` as typed), its output written whole after it, the watcher's
        lines held back meanwhile."""
        with self._lock:
            self._held = []
            self._write(f"$ hotplug-monitor {shown}", False)
        done = None
        try:
            # A group of its own: Ctrl-C is the demo's alone, which then stops the command.
            done = subprocess.run(
                argv, capture_output=True, text=True, check=False, process_group=0
            )
        finally:
            with self._lock:
                if done is not None:
                    for text in done.stdout.splitlines():
                        self._write(text, False)
                    for text in done.stderr.splitlines():
                        self._write(text, True)
                held, self._held = self._held or [], None
                for text in held:
                    self._write(text, False)

    def settle(self, generation: int, timeout: float = 10.0) -> None:
        """Until the watcher has told of ``generation``, or ``timeout`` seconds have passed."""
        with self._lock:
            self._watched.wait_for(lambda: self.generation >= generation, timeout)


def _follow(lines: IO[str], write: Callable[[str], None]) -> None:
    """Each line a process writes, handed on whole to the terminal."""
    # Ctrl-C goes to the main thread, whose waits it interrupts at once.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    for text in lines:
        write(text.rstrip("\n"))


def _follow_in_thread(lines: IO[str] | None, write: Callable[[str], None]) -> None:
    assert lines is not None  # a pipe was asked for
    threading.Thread(target=_follow, args=(lines, write), daemon=True).start()


def run(speed: float = 1.0) -> None:
    """Start a daemon on simulated GPUs, then add, break, mend, reserve and remove them while
    watching."""
    if not speed > 0 or math.isinf(speed):  # NaN too: the parser refuses these first
        raise ValueError(f"speed must be a positive number, not {speed}")
    terminal = Terminal()
    say = terminal.line
    with Simulator() as sim, tempfile.TemporaryDirectory(prefix="hotplug-demo-") as tmp:
        for kind, address, numa in GPUS:
            sim.add(kind, address, numa)
        nvml, why_not = _nvml(Path(tmp) / "nvml")
        sock, cdi = Path(tmp) / "demo.sock", Path(tmp) / "cdi"
        python = [sys.executable, "-m", "monitor"]
        daemon = subprocess.Popen(
            [*python, "serve", "--socket", str(sock), "--udev-source", "udev",
             "--cdi-dir", str(cdi), "--state-dir", str(Path(tmp) / "state"),
             "--log-level", "warning", "--log-target", "stderr",
             *([] if nvml else ["--no-nvml"])],
            env={**sim.daemon_env(), **(nvml.env() if nvml else {})},
            stderr=subprocess.PIPE,
            text=True,
            process_group=0,  # Ctrl-C stops the demo, which stops the daemon (finally)
        )  # fmt: skip
        _follow_in_thread(daemon.stderr, lambda text: terminal.line(text, err=True))  # its log
        watcher = None

        def client(*args: str) -> None:
            argv = [*python, *args[:1], "--socket", str(sock), *args[1:]]
            terminal.command(" ".join(args), argv)

        def pause(seconds: float = 1.5) -> None:
            """Until the watcher has told what the daemon knows now, then a moment to read it."""
            with Client(sock) as answers:
                terminal.settle(answers.call("fingerprint")["generation"])
            time.sleep(seconds / speed)

        try:
            _wait_for_socket(sock, daemon, nvidia_gpus=2 if nvml else 0)
            say(f"demo: daemon running on simulated hardware; socket {sock}")
            if nvml is None:
                say(f"demo: without NVML ({why_not})")
            say()
            client("devices")
            say("\ndemo: watching changes (hotplug-monitor watch):")
            watcher = subprocess.Popen(
                [*python, "watch", "--socket", str(sock)],
                stdout=subprocess.PIPE,
                text=True,
                process_group=0,  # as the daemon
            )
            _follow_in_thread(watcher.stdout, terminal.watched)
            pause(1.0)
            for what, actions in HARDWARE + (NVML if nvml else ()):
                say(f"\ndemo: {what}")
                for op, *args in actions:
                    target: Any = nvml if op.startswith("nvml.") else sim
                    getattr(target, op.removeprefix("nvml."))(*args)
                pause()
            say("\ndemo: a workload reserves both H100s")
            client("reserve", *WORKLOAD)
            pause()
            say("\ndemo: another one asks for one of them, and is told who holds it")
            client("reserve", WORKLOAD[0])
            say("\ndemo: a container engine would be given them by CDI name")
            _show_cdi(cdi, say)
            say("\ndemo: the first workload is done")
            client("release", *WORKLOAD)
            pause()
            say("\ndemo: done")
        finally:
            if watcher is not None:
                watcher.terminate()
                watcher.wait()
            daemon.terminate()
            daemon.wait()


def _show_cdi(directory: Path, say: Callable[[str], None]) -> None:
    spec = json.loads((directory / "hotplug-monitor.json").read_text())
    for device in spec["devices"]:
        if device["name"] in WORKLOAD:
            nodes = ", ".join(n["path"] for n in device["containerEdits"]["deviceNodes"])
            say(f"  podman run --device={spec['kind']}={device['name']} ... gets {nodes}")
    say(f"  ({len(spec['devices'])} CDI devices in {directory}/hotplug-monitor.json)")


def _wait_for_socket(
    sock: Path, daemon: subprocess.Popen[str], nvidia_gpus: int = 0, timeout: float = 15.0
) -> None:
    """Until the daemon answers, and NVML has told it of ``nvidia_gpus`` GPUs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise RuntimeError(f"the daemon exited with status {daemon.returncode}")
        try:
            with Client(sock) as client:
                devices = Mirror(client.call("fingerprint")).devices().values()
            if sum("uuid" in d["attributes"] for _, d in devices) >= nvidia_gpus:
                return
        except DaemonUnavailable:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"the daemon did not answer on {sock} within {timeout:.0f} s")

"""``hotplug-monitor demo``: the daemon on simulated GPUs, and a story told while watching it.

Hotplug, a PCI error and its recovery, a wedge and a rebind, an unplug and a replug, an XID
through NVML's stand-in, then what a workload sees: a reservation, another user refused it, a
release, and the CDI devices a container engine would be given.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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


def run(speed: float = 1.0) -> None:
    """Start a daemon on simulated GPUs, then add, break, mend, reserve and remove them while
    watching."""
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
        )  # fmt: skip
        watcher = None

        def client(*args: str) -> None:
            print(f"$ hotplug-monitor {' '.join(args)}", flush=True)
            subprocess.run([*python, *args[:1], "--socket", str(sock), *args[1:]], check=False)

        def pause(seconds: float = 1.5) -> None:
            time.sleep(seconds / speed)

        try:
            _wait_for_socket(sock, daemon, nvidia_gpus=2 if nvml else 0)
            print(f"demo: daemon running on simulated hardware; socket {sock}")
            if nvml is None:
                print(f"demo: without NVML ({why_not})")
            print()
            client("devices")
            print("\ndemo: watching changes (hotplug-monitor watch):", flush=True)
            watcher = subprocess.Popen([*python, "watch", "--socket", str(sock)])
            pause(1.0)
            for what, actions in HARDWARE + (NVML if nvml else ()):
                print(f"\ndemo: {what}", flush=True)
                for op, *args in actions:
                    target: Any = nvml if op.startswith("nvml.") else sim
                    getattr(target, op.removeprefix("nvml."))(*args)
                pause()
            print("\ndemo: a workload reserves both H100s", flush=True)
            client("reserve", *WORKLOAD)
            pause()
            print("\ndemo: another one asks for one of them, and is told who holds it", flush=True)
            client("reserve", WORKLOAD[0])
            print("\ndemo: a container engine would be given them by CDI name", flush=True)
            _show_cdi(cdi)
            print("\ndemo: the first workload is done", flush=True)
            client("release", *WORKLOAD)
            pause()
            print("\ndemo: done")
        finally:
            if watcher is not None:
                watcher.terminate()
                watcher.wait()
            daemon.terminate()
            daemon.wait()


def _show_cdi(directory: Path) -> None:
    spec = json.loads((directory / "hotplug-monitor.json").read_text())
    for device in spec["devices"]:
        if device["name"] in WORKLOAD:
            nodes = ", ".join(n["path"] for n in device["containerEdits"]["deviceNodes"])
            print(f"  podman run --device={spec['kind']}={device['name']} ... gets {nodes}")
    print(f"  ({len(spec['devices'])} CDI devices in {directory}/hotplug-monitor.json)")


def _wait_for_socket(
    sock: Path, daemon: subprocess.Popen[bytes], nvidia_gpus: int = 0, timeout: float = 15.0
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

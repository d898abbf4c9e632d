"""What sysfs says about PCI devices, read straight from it: the truth the daemon must match.
Shared by the kernel tests and the benchmark."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

if TYPE_CHECKING:
    from tests.conftest import Daemon

PCI = Path("/sys/bus/pci/devices")


def sysfs_truth(*pci_classes: str) -> dict[str, str | None]:
    """Every PCI device whose class (6 hex digits) starts with one given, with its bound driver."""
    truth = {}
    for path in PCI.iterdir():
        if (path / "class").read_text().strip().removeprefix("0x").startswith(pci_classes):
            driver = path / "driver"
            truth[path.name] = os.path.basename(os.readlink(driver)) if driver.exists() else None
    return truth


def snapshot_view(snapshot: dict[str, Any]) -> dict[str, str | None]:
    """A snapshot's devices with their driver attribute, comparable with ``sysfs_truth``."""
    return {
        device_id: (device["attributes"].get("driver") or {}).get("value")
        for group in snapshot["groups"].values()
        for device_id, device in group["devices"].items()
    }


def reservable() -> tuple[list[str], list[str]]:
    """PCI functions with a driver bound (healthy to us), and match-class flags for them."""
    devices = sorted(p.name for p in PCI.iterdir() if (p / "driver").exists())
    classes = sorted({(PCI / d / "class").read_text()[2:4] for d in devices})
    assert len(devices) >= 2, "needs two PCI functions with drivers bound"
    return devices, [arg for c in classes for arg in ("--match-class", c)]


def reserved_by(mirror: Any, device: str) -> str | None:
    for group in mirror.snapshot["groups"].values():
        if device in group["devices"]:
            value: str | None = group["devices"][device].get("reserved_by")
            return value
    raise AssertionError(f"{device} not in the snapshot")


def pick_device() -> tuple[str, str] | None:
    """A PCI device whose uevent file we may write, and its class (6 hex digits)."""
    if os.geteuid() != 0 or not PCI.is_dir():
        return None
    for path in sorted(PCI.iterdir()):
        if os.access(path / "uevent", os.W_OK):
            return path.name, (path / "class").read_text().strip().removeprefix("0x")
    return None


def settle(daemon: Daemon, since: float, quiet: float = 1.0, timeout: float = 30.0) -> float:
    """Wait until the daemon's generation has stood still for ``quiet`` seconds while it used
    (almost) no CPU; return when, after ``since``, its generation last changed."""
    process = psutil.Process(daemon.process.pid)
    generation, changed = None, since
    window_start, window_cpu = time.monotonic(), sum(process.cpu_times()[:2])
    while time.monotonic() - since < timeout:
        current = daemon.fingerprint()["generation"]
        now = time.monotonic()
        if current != generation:
            generation, changed = current, now
            window_start, window_cpu = now, sum(process.cpu_times()[:2])
        elif now - window_start >= quiet:
            # Busy means a core flat out; our own polling costs the daemon about 3 %.
            if sum(process.cpu_times()[:2]) - window_cpu < 0.15 * quiet:
                return max(0.0, changed - since)
            window_start, window_cpu = now, sum(process.cpu_times()[:2])
        time.sleep(0.02)  # often enough to time convergence, rarely enough not to load the daemon
    raise AssertionError(f"the daemon did not settle within {timeout} s")


def emit(address: str, actions: list[str]) -> None:
    fd = os.open(PCI / address / "uevent", os.O_WRONLY)
    try:
        for action in actions:
            os.pwrite(fd, action.encode(), 0)
    finally:
        os.close(fd)

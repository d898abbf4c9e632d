"""What sysfs says about PCI devices, read straight from it: the truth the daemon must match.
Shared by the kernel tests and the benchmark."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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

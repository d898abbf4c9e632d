"""Telemetry of AMD and Intel GPUs (and any other device with hwmon), from the kernel's sysfs.

Read only when a ``stats`` subscriber asks, in a worker thread (``read_devices`` blocks on file
reads). Every number is one the kernel wrote: a file that is missing, unreadable or not a number
leaves its statistic out of the sample, never 0.

- amdgpu, on the PCI device: ``gpu_busy_percent``, ``mem_busy_percent``, ``mem_info_vram_used``
  and ``mem_info_vram_total`` (bytes);
- hwmon below the PCI device (amdgpu, i915, xe): ``temp1_input`` and ``temp1_crit``
  (millidegrees C), ``power1_average`` or else ``power1_input`` (microwatts), ``energy1_input``
  (microjoules), ``freq1_input`` and ``freq2_input`` (amdgpu's GPU and memory clocks, Hz);
- DRM, on the device's card: i915's ``gt_cur_freq_mhz``, xe's ``device/tile0/gt0/freq0/cur_freq``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

from monitor.wire import stats

PCI_DEVICES = "/sys/bus/pci/devices"
MIB = 1 << 20
_NUMBER = re.compile(r"-?[0-9]{1,20}")
_MAX_READ = 64  # a number's file; anything longer is not one
_HWMON = re.compile(r"hwmon[0-9]{1,6}")
_CARD = re.compile(r"card[0-9]{1,7}")

Sample = dict[str, dict[str, dict[str, Any]]]  # device ID -> stat name -> {"value", "unit"}


def _number(path: str) -> int | None:
    """The integer a sysfs file holds, or None."""
    try:
        with open(path, "rb") as file:
            text = file.read(_MAX_READ + 1)
    except OSError:
        return None
    if len(text) > _MAX_READ:
        return None
    found = _NUMBER.fullmatch(text.decode("ascii", "replace").strip())
    return int(found.group()) if found else None


def _mhz(hertz: int | None) -> int | None:
    return None if hertz is None else hertz // 1_000_000


def _children(directory: str, pattern: re.Pattern[str]) -> list[str]:
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(os.path.join(directory, n) for n in names if pattern.fullmatch(n))


def read_device(address: str, root: str = PCI_DEVICES) -> dict[str, dict[str, Any]]:
    """One PCI device's statistics from sysfs: those the kernel gives. Blocking."""
    base = os.path.join(root, address)
    found: dict[str, dict[str, Any]] = {}

    def put(stat: stats.Stat, value: float | None) -> None:
        if value is not None and stat.name not in found:
            found[stat.name] = stat.value(value)

    def scaled(value: int | None, divisor: int, digits: int = 3) -> float | None:
        return None if value is None else round(value / divisor, digits)

    put(stats.GPU_UTILIZATION, _number(f"{base}/gpu_busy_percent"))
    put(stats.MEMORY_UTILIZATION, _number(f"{base}/mem_busy_percent"))
    used, total = _number(f"{base}/mem_info_vram_used"), _number(f"{base}/mem_info_vram_total")
    put(stats.MEMORY_USED, None if used is None else used // MIB)
    put(stats.MEMORY_TOTAL, None if total is None else total // MIB)
    if used is not None and total is not None:
        put(stats.MEMORY_FREE, (total - used) // MIB)
    for hwmon in _children(f"{base}/hwmon", _HWMON):
        put(stats.TEMPERATURE, scaled(_number(f"{hwmon}/temp1_input"), 1000, 1))
        put(stats.TEMPERATURE_LIMIT, scaled(_number(f"{hwmon}/temp1_crit"), 1000, 1))
        power = _number(f"{hwmon}/power1_average")
        if power is None:
            power = _number(f"{hwmon}/power1_input")
        put(stats.POWER_USAGE, scaled(power, 1_000_000))
        put(stats.ENERGY, scaled(_number(f"{hwmon}/energy1_input"), 1_000_000, 6))
        put(stats.GPU_FREQUENCY, _mhz(_number(f"{hwmon}/freq1_input")))
        put(stats.MEMORY_CLOCK, _mhz(_number(f"{hwmon}/freq2_input")))
    for card in _children(f"{base}/drm", _CARD):
        put(stats.GPU_FREQUENCY, _number(f"{card}/gt_cur_freq_mhz"))
    put(stats.GPU_FREQUENCY, _number(f"{base}/tile0/gt0/freq0/cur_freq"))
    return found


def read_devices(addresses: Iterable[str], root: str = PCI_DEVICES) -> Sample:
    """Each device's statistics, devices without any left out. Blocking: run it in a thread."""
    sample: Sample = {}
    for address in addresses:
        found = read_device(address, root)
        if found:
            sample[address] = found
    return sample

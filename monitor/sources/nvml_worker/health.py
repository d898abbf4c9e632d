"""One GPU's health conditions, read every ``--health-interval`` (``tasks.NvmlSource``).

What is read, and the condition each names (``monitor.core.conditions`` judges them):
row remapping (pending, failed), retired pages waiting for a reset, the volatile uncorrectable
ECC count, the PCIe replay counter (as a rate a minute between two reads), the clock event
reasons (hardware thermal slowdown, hardware power brake) and the state of each NVLink the GPU
has. A read NVML answers NOT_SUPPORTED (or an NVLink index it says is not there) is never made
again for this GPU, so a GPU without the feature costs nothing after the first read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import attrs
import pynvml

from monitor.core.conditions import PCIE_REPLAY_RATE_LIMIT
from monitor.sources.nvml_worker.library import error_code, is_lost

NOT_SUPPORTED: int = pynvml.NVML_ERROR_NOT_SUPPORTED
INVALID_ARGUMENT: int = pynvml.NVML_ERROR_INVALID_ARGUMENT
MAX_LINKS: int = getattr(pynvml, "NVML_NVLINK_MAX_LINKS", 18)
HW_THERMAL_SLOWDOWN = 0x40  # nvmlClocksEventReasonHwThermalSlowdown
HW_POWER_BRAKE = 0x80  # nvmlClocksEventReasonHwPowerBrakeSlowdown

Conditions = dict[str, str]  # name -> what was found


@attrs.define
class HealthReader:
    """The health reads of one GPU, and what they remember between reads. Blocking."""

    handle: Any
    unsupported: set[str] = attrs.Factory(set)  # reads NVML said this GPU does not have
    links: list[int] | None = None  # the NVLinks that exist, found at the first read
    replays: tuple[int, float] | None = None  # the last replay count, and when it was read
    clock: Callable[[], float] = time.monotonic

    def _read(self, name: str, read: Callable[[], Any]) -> Any:
        """``read()``, or None where the GPU does not support it (then never again)."""
        if name in self.unsupported:
            return None
        try:
            return read()
        except pynvml.NVMLError as exc:
            if is_lost(exc) or error_code(exc) != NOT_SUPPORTED:
                raise
            self.unsupported.add(name)
            return None

    def read(self) -> Conditions:
        found: Conditions = {}
        handle = self.handle
        rows = self._read("remapped_rows", lambda: pynvml.nvmlDeviceGetRemappedRows(handle))
        if rows is not None:
            if rows[3]:
                found["row_remap_failed"] = ""
            if rows[2]:
                found["row_remap_pending"] = ""
        pending = self._read(
            "retired_pages", lambda: pynvml.nvmlDeviceGetRetiredPagesPendingStatus(handle)
        )
        if pending == pynvml.NVML_FEATURE_ENABLED:
            found["page_retirement_pending"] = ""
        ecc = self._read(
            "ecc",
            lambda: pynvml.nvmlDeviceGetTotalEccErrors(
                handle, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC
            ),
        )
        if ecc:
            found["volatile_ecc_uncorrected"] = ""
        self._replays(found)
        reasons = self._read(
            "clock_events", lambda: pynvml.nvmlDeviceGetCurrentClocksEventReasons(handle)
        )
        if reasons is not None and reasons & HW_THERMAL_SLOWDOWN:
            found["thermal_slowdown"] = ""
        if reasons is not None and reasons & HW_POWER_BRAKE:
            found["power_brake"] = ""
        self._nvlinks(found)
        return found

    def _replays(self, found: Conditions) -> None:
        count = self._read(
            "pcie_replays", lambda: pynvml.nvmlDeviceGetPcieReplayCounter(self.handle)
        )
        if count is None:
            return
        now, last = self.clock(), self.replays
        self.replays = (count, now)
        if last is None or count < last[0] or now <= last[1]:
            return  # the first read, or the counter was reset: a new baseline
        rate = (count - last[0]) * 60 / (now - last[1])
        if rate >= PCIE_REPLAY_RATE_LIMIT:
            found["pcie_replay_storm"] = ""
        elif rate > 0:
            found["pcie_replays"] = ""

    def _nvlinks(self, found: Conditions) -> None:
        if "nvlink" in self.unsupported:
            return
        if self.links is None:  # which links exist: those NVML answers for
            self.links = []
            for link in range(MAX_LINKS):
                try:
                    pynvml.nvmlDeviceGetNvLinkState(self.handle, link)
                except pynvml.NVMLError as exc:
                    if is_lost(exc) or error_code(exc) not in (NOT_SUPPORTED, INVALID_ARGUMENT):
                        raise
                    continue
                self.links.append(link)
            if not self.links:
                self.unsupported.add("nvlink")
                return
        down = [
            link
            for link in self.links
            if pynvml.nvmlDeviceGetNvLinkState(self.handle, link) != pynvml.NVML_FEATURE_ENABLED
        ]
        if down:
            found["nvlink_down"] = "link " + ", ".join(map(str, down))

"""What the worker shows of one GPU: its identity and the attributes NVML gives for it."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pynvml

from monitor.core.events import NvmlGpu
from monitor.core.model import Attribute
from monitor.sources.nvml_worker.library import MIB, is_lost, text

_DOMAIN = re.compile(r"[0-9a-f]{1,8}")  # int(x, 16) would also take "1_0" and " +1"

# PCIe throughput per lane and direction, MB/s, by generation (after line encoding).
LANE_MB_PER_S = {1: 250, 2: 500, 3: 985, 4: 1969, 5: 3938, 6: 7877}


def normalise_bus_id(raw: str | bytes) -> str:
    """NVML's ``00000000:3B:00.0`` (8-digit domain, maybe NUL-padded) as the kernel writes it."""
    bus_id = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
    bus_id = bus_id.split("\x00", 1)[0].strip().lower()
    domain, _, rest = bus_id.partition(":")
    if not rest or not _DOMAIN.fullmatch(domain):
        return bus_id  # not a bus ID: matches no GPU's address, and read_gpu says so
    return f"{int(domain, 16):04x}:{rest}"


def read_gpu(address: str, handle: Any) -> NvmlGpu:
    """Everything we show of one GPU; what the GPU does not support is left out. Blocking."""
    reported = normalise_bus_id(pynvml.nvmlDeviceGetPciInfo(handle).busId)
    if reported != address:
        raise RuntimeError(f"NVML gave the GPU at {reported} for {address}")
    attributes: dict[str, Attribute] = {}

    def add(name: str, read: Callable[[], Any], unit: str | None = None) -> None:
        try:
            attributes[name] = Attribute(read(), unit)
        except pynvml.NVMLError as exc:
            if is_lost(exc):
                raise
            # not supported on this GPU or driver: not shown

    add("memory", lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).total // MIB, "MiB")
    add("bar1", lambda: pynvml.nvmlDeviceGetBAR1MemoryInfo(handle).bar1Total // MIB, "MiB")
    add("power", lambda: pynvml.nvmlDeviceGetPowerManagementLimit(handle) // 1000, "W")
    add(
        "cores_clock", lambda: pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM), "MHz"
    )
    add(
        "memory_clock",
        lambda: pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM),
        "MHz",
    )
    add(
        "pci_bandwidth",
        lambda: (
            LANE_MB_PER_S[pynvml.nvmlDeviceGetMaxPcieLinkGeneration(handle)]
            * pynvml.nvmlDeviceGetMaxPcieLinkWidth(handle)
        ),
        "MB/s",
    )
    add("driver_version", lambda: text(pynvml.nvmlSystemGetDriverVersion()))
    add(
        "cuda_compute_capability",
        lambda: "{}.{}".format(*pynvml.nvmlDeviceGetCudaComputeCapability(handle)),
    )
    enabled = {0: "disabled", 1: "enabled"}
    add("persistence_mode", lambda: enabled[pynvml.nvmlDeviceGetPersistenceMode(handle)])
    add("display_state", lambda: enabled[pynvml.nvmlDeviceGetDisplayMode(handle)])
    add("mig_mode", lambda: enabled[pynvml.nvmlDeviceGetMigMode(handle)[0]])
    try:
        minor: int | None = pynvml.nvmlDeviceGetMinorNumber(handle)
    except pynvml.NVMLError as exc:
        if is_lost(exc):
            raise
        minor = None
    return NvmlGpu(
        address=address,
        uuid=text(pynvml.nvmlDeviceGetUUID(handle)),
        name=text(pynvml.nvmlDeviceGetName(handle)),
        minor=minor,
        attributes=attributes,
    )

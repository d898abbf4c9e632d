"""NVML's health events for one GPU: the event set the worker waits on, and its events as ours."""

from __future__ import annotations

from typing import Any

import pynvml

from monitor.core.events import NvmlEventReported, XidReported
from monitor.core.mig import NO_INSTANCE
from monitor.sources.nvml_worker.pipe import NvmlEvent

EVENT_XID = getattr(pynvml, "nvmlEventTypeXidCriticalError", 0x0008)
EVENT_DOUBLE_BIT_ECC = getattr(pynvml, "nvmlEventTypeDoubleBitEccError", 0x0002)
EVENT_GPU_UNAVAILABLE = getattr(pynvml, "nvmlEventTypeGpuUnavailableError", 0x4000)
EVENT_RECOVERY_ACTION = getattr(pynvml, "nvmlEventTypeGpuRecoveryAction", 0x8000)
EVENT_MIG_CONFIG_CHANGE = getattr(pynvml, "nvmlEventMigConfigChange", 0x0100)
WATCHED_EVENTS = (
    EVENT_XID
    | EVENT_DOUBLE_BIT_ECC
    | EVENT_GPU_UNAVAILABLE
    | EVENT_RECOVERY_ACTION
    | EVENT_MIG_CONFIG_CHANGE
)


class MigConfigChanged:
    """NVML says the GPU's MIG configuration changed: its layout is read again."""


def watch_events(handle: Any) -> Any:
    """An event set for this GPU's health events, those it supports. Blocking."""
    supported = pynvml.nvmlDeviceGetSupportedEventTypes(handle)
    events = pynvml.nvmlEventSetCreate()
    try:
        pynvml.nvmlDeviceRegisterEvents(handle, WATCHED_EVENTS & supported, events)
    except BaseException:
        pynvml.nvmlEventSetFree(events)
        raise
    return events


def _instance(value: Any) -> int | None:
    """An event's GPU or compute instance ID; None for NVML's "none" (0xFFFFFFFF)."""
    return None if value is None or int(value) == NO_INSTANCE else int(value)


def translate(address: str, data: Any) -> NvmlEvent | MigConfigChanged | None:
    """One NVML event as ours."""
    kind, value = data.eventType, int(data.eventData)
    if kind & EVENT_XID:
        gi = _instance(getattr(data, "gpuInstanceId", None))
        ci = _instance(getattr(data, "computeInstanceId", None)) if gi is not None else None
        return XidReported(address, value, source="nvml", gpu_instance=gi, compute_instance=ci)
    if kind & EVENT_MIG_CONFIG_CHANGE:
        return MigConfigChanged()
    if kind & EVENT_DOUBLE_BIT_ECC:
        return NvmlEventReported(address, "double_bit_ecc")
    if kind & EVENT_GPU_UNAVAILABLE:
        return NvmlEventReported(address, "gpu_unavailable")
    if kind & EVENT_RECOVERY_ACTION:
        return NvmlEventReported(address, "recovery_action", value)
    return None

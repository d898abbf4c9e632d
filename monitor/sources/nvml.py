"""NVML source: what NVIDIA's library says of each GPU, translated into events.

One task per NVIDIA GPU that udev reports bound to the ``nvidia`` driver. It finds the GPU in
NVML by its PCI address, reads its facts, registers an event set of its own for XIDs and the
other health events the GPU supports, and waits on it. Every NVML call runs in a worker thread,
so the trio loop never blocks; and because each GPU has its own task and event set, a call that
hangs (as NVML's do when a GPU falls off the bus) holds up that GPU alone. A call slower than the
deadline marks the GPU "NVML not responding" until it returns.

A GPU is read again when udev reports it added or rebound, and after the evidence of a reset
(a recovery that cleared its problems), never on a timer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import pynvml
import trio

from monitor.events import (
    Event,
    NvmlEventReported,
    NvmlGpu,
    NvmlGpuSeen,
    NvmlReachable,
    NvmlUnreachable,
    XidReported,
)
from monitor.health import CAUSE_PCI_ERROR
from monitor.hub import Hub
from monitor.logs import MESSAGE_IDS
from monitor.model import Attribute
from monitor.reducer import State

log = logging.getLogger(__name__)

T = TypeVar("T")
Send = trio.MemorySendChannel[Any]

NVIDIA_VENDOR_ID = 0x10DE
WAIT_MS = 500  # one nvmlEventSetWait_v2 call; short, so that a cancelled wait ends soon
RETRY_SECONDS = 5.0  # between attempts to reach a GPU that NVML could not
MIB = 1 << 20

EVENT_XID = getattr(pynvml, "nvmlEventTypeXidCriticalError", 0x0008)
EVENT_DOUBLE_BIT_ECC = getattr(pynvml, "nvmlEventTypeDoubleBitEccError", 0x0002)
EVENT_GPU_UNAVAILABLE = getattr(pynvml, "nvmlEventTypeGpuUnavailableError", 0x4000)
EVENT_RECOVERY_ACTION = getattr(pynvml, "nvmlEventTypeGpuRecoveryAction", 0x8000)
WATCHED_EVENTS = EVENT_XID | EVENT_DOUBLE_BIT_ECC | EVENT_GPU_UNAVAILABLE | EVENT_RECOVERY_ACTION

GPU_IS_LOST: int = pynvml.NVML_ERROR_GPU_IS_LOST
TIMEOUT: int = pynvml.NVML_ERROR_TIMEOUT

# PCIe throughput per lane and direction, MB/s, by generation (after line encoding).
LANE_MB_PER_S = {1: 250, 2: 500, 3: 985, 4: 1969, 5: 3938, 6: 7877}


def normalise_bus_id(raw: str | bytes) -> str:
    """NVML's ``00000000:3B:00.0`` (8-digit domain, maybe NUL-padded) as the kernel writes it."""
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
    text = text.split("\x00", 1)[0].strip().lower()
    domain, _, rest = text.partition(":")
    return f"{int(domain, 16):04x}:{rest}" if rest else text


def _error_code(exc: BaseException) -> int | None:
    code = getattr(exc, "value", None) if isinstance(exc, pynvml.NVMLError) else None
    return code if isinstance(code, int) else None


def _is_lost(exc: BaseException) -> bool:
    return _error_code(exc) == GPU_IS_LOST


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


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
            if _is_lost(exc):
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
    add("driver_version", lambda: _text(pynvml.nvmlSystemGetDriverVersion()))
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
        if _is_lost(exc):
            raise
        minor = None
    return NvmlGpu(
        address=address,
        uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
        name=_text(pynvml.nvmlDeviceGetName(handle)),
        minor=minor,
        attributes=attributes,
    )


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


def translate(address: str, data: Any) -> Event | None:
    """One NVML event as ours."""
    kind, value = data.eventType, int(data.eventData)
    if kind & EVENT_XID:
        return XidReported(address, value)
    if kind & EVENT_DOUBLE_BIT_ECC:
        return NvmlEventReported(address, "double_bit_ecc")
    if kind & EVENT_GPU_UNAVAILABLE:
        return NvmlEventReported(address, "gpu_unavailable")
    if kind & EVENT_RECOVERY_ACTION:
        return NvmlEventReported(address, "recovery_action", value)
    return None


class NvmlSource:
    def __init__(self, send: Send, hub: Hub, *, deadline: float, limiter: trio.CapacityLimiter):
        self.send = send
        self.hub = hub
        self.deadline = deadline
        self.limiter = limiter
        self.watching: dict[str, trio.CancelScope] = {}
        self.nursery: trio.Nursery | None = None  # the GPU tasks' and their call watchers'

    async def call(
        self, address: str, function: Callable[..., T], *args: Any, waits: float = 0.0
    ) -> T:
        """``function(*args)`` in a worker thread. If it takes longer than the deadline (plus
        the ``waits`` it was asked to wait) the GPU is reported not responding, and reachable
        again once the call returns."""
        returned = trio.Event()
        slow: list[bool] = []
        assert self.nursery is not None
        limit = self.deadline + waits
        self.nursery.start_soon(self._flag_if_slow, address, function, limit, returned, slow)
        try:
            return await trio.to_thread.run_sync(
                function, *args, limiter=self.limiter, abandon_on_cancel=True
            )
        finally:
            returned.set()
            if slow:
                with trio.CancelScope(shield=True):
                    await self.send.send((NvmlReachable(address),))

    async def _flag_if_slow(
        self,
        address: str,
        function: Callable[..., Any],
        limit: float,
        returned: trio.Event,
        slow: list[bool],
    ) -> None:
        with trio.move_on_after(limit):
            await returned.wait()
            return
        slow.append(True)
        name = getattr(function, "__name__", "an NVML call")
        reason = f"NVML not responding ({name} has not returned for {limit:g} s)"
        log.error("%s: %s", address, reason)
        await self.send.send((NvmlUnreachable(address, reason),))

    async def follow(self) -> None:
        """Keep one watch task per NVIDIA GPU that udev shows bound to the nvidia driver (an
        unbind ends it, a bind starts a new one); start it again when a PCI error recovery
        reset the GPU."""
        pci_errors: set[str] = set()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            while True:
                published = self.hub.published
                state = self.hub.state
                present = self._nvidia_gpus(state)
                before, pci_errors = (
                    pci_errors,
                    {a for a, causes in state.problems.items() if CAUSE_PCI_ERROR in causes},
                )
                for address in [a for a in self.watching if a not in present]:
                    self.watching.pop(address).cancel()
                for address in present:
                    known = self.watching.get(address)
                    reset = address in before and address not in pci_errors
                    if known is not None and not reset:
                        continue
                    if known is not None:
                        known.cancel()
                    scope = trio.CancelScope()
                    self.watching[address] = scope
                    nursery.start_soon(self.watch, address, scope)
                await published.wait()

    @staticmethod
    def _nvidia_gpus(state: State) -> set[str]:
        """The NVIDIA devices we show, bound to the nvidia driver."""
        shown = state.fingerprint.devices()
        return {
            address
            for address, facts in state.devices.items()
            if facts.vendor_id == NVIDIA_VENDOR_ID and facts.driver == "nvidia" and address in shown
        }

    async def watch(self, address: str, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                try:
                    await self._watch_once(address)
                except (pynvml.NVMLError, RuntimeError) as exc:
                    lost = _is_lost(exc)
                    reason = (
                        "GPU has fallen off the bus (NVML: GPU is lost)"
                        if lost
                        else f"NVML cannot watch this GPU: {exc}"
                    )
                    log.error("%s: %s", address, reason)
                    await self.send.send((NvmlUnreachable(address, reason, lost=lost),))
                await trio.sleep(RETRY_SECONDS)

    async def _watch_once(self, address: str) -> None:
        handle = await self.call(address, pynvml.nvmlDeviceGetHandleByPciBusId, address)
        gpu = await self.call(address, read_gpu, address, handle)
        events = await self.call(address, watch_events, handle)
        try:
            await self.send.send((NvmlGpuSeen(gpu), NvmlReachable(address)))
            log.info("%s: watching %s (%s) through NVML", address, gpu.name, gpu.uuid)
            while True:
                try:
                    wait = pynvml.nvmlEventSetWait_v2
                    data = await self.call(address, wait, events, WAIT_MS, waits=WAIT_MS / 1000)
                except pynvml.NVMLError as exc:
                    if _error_code(exc) == TIMEOUT:
                        continue
                    raise
                event = translate(address, data)
                if event is None:
                    continue
                if isinstance(event, XidReported):
                    self._log_xid(gpu, event.xid)
                await self.send.send((event,))
                if isinstance(event, NvmlEventReported) and event.action == 0:
                    # reset done: what the GPU reports may have changed
                    gpu = await self.call(address, read_gpu, address, handle)
                    await self.send.send((NvmlGpuSeen(gpu),))
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(self.deadline):
                await trio.to_thread.run_sync(
                    pynvml.nvmlEventSetFree, events, abandon_on_cancel=True
                )

    @staticmethod
    def _log_xid(gpu: NvmlGpu, xid: int) -> None:
        log.warning(
            "%s (%s): XID %d",
            gpu.address,
            gpu.uuid,
            xid,
            extra={
                "journal": {
                    "MESSAGE_ID": MESSAGE_IDS["xid"],
                    "DEVICE_ID": gpu.address,
                    "PCI_BUS_ID": gpu.address,
                    "GPU_UUID": gpu.uuid,
                    "XID": xid,
                }
            },
        )


async def run_nvml_source(send: Send, hub: Hub, *, deadline: float = 5.0) -> None:
    """Watch every NVIDIA GPU through NVML; without NVML, say so once and return."""
    limiter = trio.CapacityLimiter(64)  # one call per GPU at most; never the loop's own threads
    try:
        await trio.to_thread.run_sync(pynvml.nvmlInit, limiter=limiter, abandon_on_cancel=True)
    except pynvml.NVMLError as exc:
        log.info(
            "NVML is not available (%s): NVIDIA GPUs are followed through udev alone, "
            "without XIDs or NVML's attributes",
            exc,
        )
        return
    try:
        version = await trio.to_thread.run_sync(
            pynvml.nvmlSystemGetDriverVersion, limiter=limiter, abandon_on_cancel=True
        )
        log.info("NVML ready, driver %s", _text(version))
        await NvmlSource(send, hub, deadline=deadline, limiter=limiter).follow()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(deadline):
            await trio.to_thread.run_sync(pynvml.nvmlShutdown, abandon_on_cancel=True)

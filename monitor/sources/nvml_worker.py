"""The NVML worker: NVIDIA's library in a process of its own, translated into events.

The daemon runs ``python -m monitor.sources.nvml_worker`` (monitor/sources/nvml.py), so that a
crash inside ``libnvidia-ml.so.1`` ends this process and not the daemon. On stdin it gets JSON
lines ``{"watch": [address, ...], "reset": [address, ...]}``: the NVIDIA GPUs udev shows bound to
``nvidia``, and those a recovery reset. On stdout it writes one JSON line per event. It exits at
the end of stdin, or with EXIT_NO_NVML after saying once that NVML is not there.

One task per GPU finds it in NVML by its PCI address, reads its facts, registers an event set of
its own for XIDs and the other health events the GPU supports, and waits on it. Every NVML call
runs in a worker thread, so the trio loop never blocks; and because each GPU has its own task and
event set, a call that hangs (as NVML's do when a GPU falls off the bus) holds up that GPU alone.
A call slower than the deadline marks the GPU "NVML not responding" until it returns.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import attrs
import pynvml
import trio

from monitor.core.events import (
    NvmlEventReported,
    NvmlGpu,
    NvmlGpuSeen,
    NvmlReachable,
    NvmlUnreachable,
    XidReported,
)
from monitor.core.model import Attribute
from monitor.outputs import logs
from monitor.outputs.logs import MESSAGE_IDS
from monitor.wire.framing import LineBuffer

log = logging.getLogger("monitor.sources.nvml_worker")  # also when run as __main__

T = TypeVar("T")
NvmlEvent = NvmlGpuSeen | XidReported | NvmlEventReported | NvmlUnreachable | NvmlReachable
Send = trio.MemorySendChannel[NvmlEvent]

EXIT_NO_NVML = 3  # NVML is not there: nothing to restart
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


def translate(address: str, data: Any) -> NvmlEvent | None:
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
    def __init__(self, send: Send, *, deadline: float, limiter: trio.CapacityLimiter) -> None:
        self.send = send
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
                    await self.send.send(NvmlReachable(address))

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
        await self.send.send(NvmlUnreachable(address, reason))

    async def follow(self, targets: AsyncIterator[tuple[set[str], set[str]]]) -> None:
        """Keep one watch task per GPU named in the latest ``(watch, reset)``: a GPU that leaves
        the set is let go, and one in ``reset`` is watched afresh."""
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            async for watch, reset in targets:
                for address in [a for a in self.watching if a not in watch]:
                    self.watching.pop(address).cancel()
                for address in watch:
                    known = self.watching.get(address)
                    if known is not None and address not in reset:
                        continue
                    if known is not None:
                        known.cancel()
                    scope = trio.CancelScope()
                    self.watching[address] = scope
                    nursery.start_soon(self.watch, address, scope)
            nursery.cancel_scope.cancel()

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
                    await self.send.send(NvmlUnreachable(address, reason, lost=lost))
                await trio.sleep(RETRY_SECONDS)

    async def _watch_once(self, address: str) -> None:
        handle = await self.call(address, pynvml.nvmlDeviceGetHandleByPciBusId, address)
        gpu = await self.call(address, read_gpu, address, handle)
        events = await self.call(address, watch_events, handle)
        try:
            await self.send.send(NvmlGpuSeen(gpu))
            await self.send.send(NvmlReachable(address))
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
                await self.send.send(event)
                if isinstance(event, NvmlEventReported) and event.action == 0:
                    # reset done: what the GPU reports may have changed
                    gpu = await self.call(address, read_gpu, address, handle)
                    await self.send.send(NvmlGpuSeen(gpu))
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


# --- the pipe to the daemon ---------------------------------------------------------------

_EVENT_TYPES: dict[str, type[NvmlEvent]] = {
    cls.__name__: cls
    for cls in (NvmlGpuSeen, XidReported, NvmlEventReported, NvmlUnreachable, NvmlReachable)
}


def _plain(value: Any) -> Any:
    """For json.dumps: a frozen mapping as a dict, an attribute as its JSON."""
    if isinstance(value, Attribute):
        return value.to_json()
    return dict(value)


def encode_event(event: NvmlEvent) -> bytes:
    fields = {"event": type(event).__name__, **attrs.asdict(event, recurse=False)}
    if isinstance(event, NvmlGpuSeen):
        fields["gpu"] = attrs.asdict(event.gpu, recurse=False)
    return json.dumps(fields, default=_plain).encode() + b"\n"


def decode_event(line: bytes) -> NvmlEvent:
    """One line of the worker's output as the event it stands for; ValueError if it is none."""
    try:
        fields = json.loads(line)
        cls = _EVENT_TYPES[fields.pop("event")]
        if cls is NvmlGpuSeen:
            gpu = fields["gpu"]
            attributes = {k: Attribute(**v) for k, v in gpu.pop("attributes").items()}
            return NvmlGpuSeen(NvmlGpu(**gpu, attributes=attributes))
        return cls(**fields)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not an NVML event: {line[:200]!r} ({exc!r})") from None


async def _targets(stdin: trio.abc.ReceiveStream) -> AsyncIterator[tuple[set[str], set[str]]]:
    buffer = LineBuffer()
    while data := await stdin.receive_some(1 << 16):
        for line in buffer.feed(data):
            message = json.loads(line)
            yield set(message["watch"]), set(message["reset"])


async def _write_events(events: trio.MemoryReceiveChannel[NvmlEvent]) -> None:
    stdout = trio.lowlevel.FdStream(os.dup(1))
    async for event in events:
        await stdout.send_all(encode_event(event))


async def serve(deadline: float) -> int:
    """Watch the GPUs the daemon names until stdin ends; the exit status."""
    limiter = trio.CapacityLimiter(64)  # one call per GPU at most; never the loop's own threads
    try:
        await trio.to_thread.run_sync(pynvml.nvmlInit, limiter=limiter, abandon_on_cancel=True)
    except pynvml.NVMLError as exc:
        log.info(
            "NVML is not available (%s): NVIDIA GPUs are followed through udev alone, "
            "without XIDs or NVML's attributes",
            exc,
        )
        return EXIT_NO_NVML
    try:
        version = await trio.to_thread.run_sync(
            pynvml.nvmlSystemGetDriverVersion, limiter=limiter, abandon_on_cancel=True
        )
        log.info("NVML ready, driver %s", _text(version))
        send, receive = trio.open_memory_channel[NvmlEvent](64)
        source = NvmlSource(send, deadline=deadline, limiter=limiter)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_write_events, receive)
            await source.follow(_targets(trio.lowlevel.FdStream(os.dup(0))))
            nursery.cancel_scope.cancel()
        return 0
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(deadline):
            await trio.to_thread.run_sync(pynvml.nvmlShutdown, abandon_on_cancel=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="hotplug-monitor's NVML worker (run by serve)")
    parser.add_argument("--deadline", type=float, default=5.0)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-target", default="auto")
    args = parser.parse_args()
    # The daemon stops us by closing stdin; a signal meant for the whole service (Ctrl-C, or
    # systemd's SIGTERM to the control group) must not look like a crash to it first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logs.setup(args.log_level, args.log_target)
    raise SystemExit(trio.run(serve, args.deadline))


if __name__ == "__main__":
    main()

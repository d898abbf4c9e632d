"""The NVML worker: NVIDIA's library in a process of its own, translated into events.

The daemon runs ``python -m monitor.sources.nvml_worker`` (monitor/sources/nvml.py), so that a
crash inside ``libnvidia-ml.so.1`` ends this process and not the daemon. On stdin it gets JSON
lines ``{"watch": [address, ...], "reset": [address, ...]}``: the NVIDIA GPUs udev shows bound to
``nvidia``, and those a recovery reset. On stdout it writes one JSON line per event. It exits at
the end of stdin, or with EXIT_NO_NVML after saying once that NVML is not there.

A line ``{"sample": N}`` asks for the GPUs' statistics (the ``stats`` method): each watched GPU is
read in a thread of its own (``read_stats``), and one line ``{"event": "StatsSample", "seq": N,
"devices": {...}}`` answers with those that answered within SAMPLE_WINDOW; a GPU whose read has
not returned is left out of that sample and of the next ones until it does, and its read, like
every call, has the deadline. Nothing is read for statistics unless asked.

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
from collections.abc import AsyncIterator, Callable, Iterable
from functools import partial
from operator import itemgetter
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
from monitor.wire import stats
from monitor.wire.framing import LineBuffer

log = logging.getLogger("monitor.sources.nvml_worker")  # also when run as __main__

T = TypeVar("T")
NvmlEvent = NvmlGpuSeen | XidReported | NvmlEventReported | NvmlUnreachable | NvmlReachable
Stats = dict[str, dict[str, Any]]  # stat name -> {"value", "unit"}


@attrs.frozen
class StatsSample:
    """The answer to ``{"sample": seq}``: each GPU that answered in time, by PCI address."""

    seq: int
    devices: dict[str, Stats]


Output = NvmlEvent | StatsSample
Send = trio.MemorySendChannel[Output]

EXIT_NO_NVML = 3  # NVML is not there: nothing to restart
WAIT_MS = 500  # one nvmlEventSetWait_v2 call; short, so that a cancelled wait ends soon
RETRY_SECONDS = 5.0  # between attempts to reach a GPU that NVML could not
SAMPLE_WINDOW = 0.5  # how long a sample waits for the GPUs' reads (at most the deadline)
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


def _reasons(bits: int) -> str:
    return ",".join(name for name, bit in stats.THROTTLE_REASON_BITS.items() if bits & bit)


def _retired(handle: Any, cause: int) -> int:
    return len(pynvml.nvmlDeviceGetRetiredPages(handle, cause))


def read_stats(handle: Any) -> Stats:
    """One GPU's statistics; what it does not support is left out. Blocking."""
    found: Stats = {}

    def add(stat: stats.Stat, read: Callable[[], Any]) -> None:
        try:
            found[stat.name] = stat.value(read())
        except pynvml.NVMLError as exc:
            if _is_lost(exc):
                raise
            # not supported on this GPU or driver: not in the sample

    Picks = Iterable[tuple[stats.Stat, Callable[[Any], Any]]]

    def add_all(pairs: Picks, read: Callable[[], Any]) -> None:
        """Several statistics from one call: each ``pick`` of what it returned."""
        try:
            answer = read()
        except pynvml.NVMLError as exc:
            if _is_lost(exc):
                raise
            return
        for stat, pick in pairs:
            found[stat.name] = stat.value(pick(answer))

    n = pynvml
    add_all(
        ((stats.GPU_UTILIZATION, lambda u: u.gpu), (stats.MEMORY_UTILIZATION, lambda u: u.memory)),
        partial(n.nvmlDeviceGetUtilizationRates, handle),
    )
    add(stats.ENCODER_UTILIZATION, lambda: n.nvmlDeviceGetEncoderUtilization(handle)[0])
    add(stats.DECODER_UTILIZATION, lambda: n.nvmlDeviceGetDecoderUtilization(handle)[0])
    add(stats.TEMPERATURE, lambda: n.nvmlDeviceGetTemperature(handle, n.NVML_TEMPERATURE_GPU))
    add(
        stats.TEMPERATURE_LIMIT,
        lambda: n.nvmlDeviceGetTemperatureThreshold(handle, n.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN),
    )
    add(stats.POWER_USAGE, lambda: n.nvmlDeviceGetPowerUsage(handle) / 1000)
    add(stats.ENERGY, lambda: n.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000)
    add_all(
        (
            (stats.MEMORY_USED, lambda m: m.used // MIB),
            (stats.MEMORY_FREE, lambda m: m.free // MIB),
            (stats.MEMORY_TOTAL, lambda m: m.total // MIB),
        ),
        partial(n.nvmlDeviceGetMemoryInfo, handle),
    )
    add_all(
        (
            (stats.BAR1_USED, lambda b: b.bar1Used // MIB),
            (stats.BAR1_TOTAL, lambda b: b.bar1Total // MIB),
        ),
        partial(n.nvmlDeviceGetBAR1MemoryInfo, handle),
    )
    add(stats.SM_CLOCK, lambda: n.nvmlDeviceGetClockInfo(handle, n.NVML_CLOCK_SM))
    add(stats.MEMORY_CLOCK, lambda: n.nvmlDeviceGetClockInfo(handle, n.NVML_CLOCK_MEM))
    add(stats.PCIE_TX, lambda: n.nvmlDeviceGetPcieThroughput(handle, n.NVML_PCIE_UTIL_TX_BYTES))
    add(stats.PCIE_RX, lambda: n.nvmlDeviceGetPcieThroughput(handle, n.NVML_PCIE_UTIL_RX_BYTES))
    uncorrected = n.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    corrected = n.NVML_MEMORY_ERROR_TYPE_CORRECTED
    volatile, aggregate = n.NVML_VOLATILE_ECC, n.NVML_AGGREGATE_ECC
    for stat, kind, counter in (
        (stats.ECC_VOLATILE_CORRECTED, corrected, volatile),
        (stats.ECC_VOLATILE_UNCORRECTED, uncorrected, volatile),
        (stats.ECC_AGGREGATE_CORRECTED, corrected, aggregate),
        (stats.ECC_AGGREGATE_UNCORRECTED, uncorrected, aggregate),
    ):
        add(stat, partial(n.nvmlDeviceGetTotalEccErrors, handle, kind, counter))
    for stat, location in (
        (stats.ECC_L1, n.NVML_MEMORY_LOCATION_L1_CACHE),
        (stats.ECC_L2, n.NVML_MEMORY_LOCATION_L2_CACHE),
        (stats.ECC_MEMORY, n.NVML_MEMORY_LOCATION_DEVICE_MEMORY),
    ):
        read = partial(n.nvmlDeviceGetMemoryErrorCounter, handle, uncorrected, volatile, location)
        add(stat, read)
    sbe = n.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS
    add(stats.RETIRED_PAGES_SBE, lambda: _retired(handle, sbe))
    dbe = n.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR
    add(stats.RETIRED_PAGES_DBE, lambda: _retired(handle, dbe))
    add(
        stats.RETIRED_PAGES_PENDING,
        lambda: int(n.nvmlDeviceGetRetiredPagesPendingStatus(handle) == n.NVML_FEATURE_ENABLED),
    )
    add_all(
        (
            (stats.REMAPPED_ROWS_CORRECTABLE, itemgetter(0)),
            (stats.REMAPPED_ROWS_UNCORRECTABLE, itemgetter(1)),
            (stats.REMAPPED_ROWS_PENDING, itemgetter(2)),
            (stats.REMAPPED_ROWS_FAILED, itemgetter(3)),
        ),
        partial(n.nvmlDeviceGetRemappedRows, handle),
    )
    try:
        bits = n.nvmlDeviceGetCurrentClocksEventReasons(handle)
    except n.NVMLError as exc:
        if _is_lost(exc):
            raise
        bits = None
        if _error_code(exc) == n.NVML_ERROR_FUNCTION_NOT_FOUND:  # a driver before 535
            add(
                stats.THROTTLE_REASONS,
                lambda: _reasons(n.nvmlDeviceGetCurrentClocksThrottleReasons(handle)),
            )
    if bits is not None:
        found[stats.THROTTLE_REASONS.name] = stats.THROTTLE_REASONS.value(_reasons(bits))
    return found


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
        self.handles: dict[str, Any] = {}  # the GPUs watched now, for their statistics
        self.sampling: set[str] = set()  # GPUs whose statistics read has not returned yet

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
            self.handles[address] = handle
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
            if self.handles.get(address) is handle:
                del self.handles[address]
            with trio.CancelScope(shield=True), trio.move_on_after(self.deadline):
                await trio.to_thread.run_sync(
                    pynvml.nvmlEventSetFree, events, abandon_on_cancel=True
                )

    async def sample(self, seq: int) -> None:
        """Send the statistics of every watched GPU that answers within SAMPLE_WINDOW."""
        assert self.nursery is not None
        results: dict[str, Stats] = {}
        waiting = {a for a in self.handles if a not in self.sampling}
        answered = trio.Event()
        closed: list[bool] = []

        async def read(address: str, handle: Any) -> None:
            try:
                found = await self.call(address, read_stats, handle)
                if not closed:
                    results[address] = found
            except pynvml.NVMLError as exc:
                log.debug("%s: no statistics: %s", address, exc)
            finally:
                self.sampling.discard(address)
                waiting.discard(address)
                if not waiting:
                    answered.set()

        for address in sorted(waiting):
            self.sampling.add(address)
            self.nursery.start_soon(read, address, self.handles[address])
        if waiting:
            with trio.move_on_after(min(SAMPLE_WINDOW, self.deadline)):
                await answered.wait()
        closed.append(True)
        await self.send.send(StatsSample(seq, dict(results)))

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


def encode_event(event: Output) -> bytes:
    fields = {"event": type(event).__name__, **attrs.asdict(event, recurse=False)}
    if isinstance(event, NvmlGpuSeen):
        fields["gpu"] = attrs.asdict(event.gpu, recurse=False)
    return json.dumps(fields, default=_plain).encode() + b"\n"


def decode_event(line: bytes) -> Output:
    """One line of the worker's output as the event it stands for; ValueError if it is none."""
    try:
        fields = json.loads(line)
        name = fields.pop("event")
        if name == "StatsSample":
            seq, devices = fields["seq"], fields["devices"]
            if not isinstance(seq, int) or not isinstance(devices, dict):
                raise TypeError("malformed sample")
            return StatsSample(seq, devices)
        cls = _EVENT_TYPES[name]
        if cls is NvmlGpuSeen:
            gpu = fields["gpu"]
            attributes = {k: Attribute(**v) for k, v in gpu.pop("attributes").items()}
            return NvmlGpuSeen(NvmlGpu(**gpu, attributes=attributes))
        return cls(**fields)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not an NVML event: {line[:200]!r} ({exc!r})") from None


async def _targets(
    stdin: trio.abc.ReceiveStream, source: NvmlSource
) -> AsyncIterator[tuple[set[str], set[str]]]:
    """The GPUs to watch, from each ``watch`` line; a ``sample`` line starts a sample."""
    buffer = LineBuffer()
    while data := await stdin.receive_some(1 << 16):
        for line in buffer.feed(data):
            message = json.loads(line)
            if "sample" in message:
                assert source.nursery is not None  # the first watch line came before
                source.nursery.start_soon(source.sample, int(message["sample"]))
                continue
            yield set(message["watch"]), set(message["reset"])


async def _write_events(events: trio.MemoryReceiveChannel[Output]) -> None:
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
        send, receive = trio.open_memory_channel[Output](64)
        source = NvmlSource(send, deadline=deadline, limiter=limiter)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_write_events, receive)
            await source.follow(_targets(trio.lowlevel.FdStream(os.dup(0)), source))
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

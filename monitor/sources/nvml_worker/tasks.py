"""The worker's tasks: one per GPU, watching it through NVML, and the samples of statistics.

One task per GPU finds it in NVML by its PCI address, reads its facts, registers an event set of
its own for XIDs and the other health events the GPU supports, and waits on it. Every NVML call
runs in a worker thread, so the trio loop never blocks; and because each GPU has its own task and
event set, a call that hangs (as NVML's do when a GPU falls off the bus) holds up that GPU alone.
A call slower than the deadline marks the GPU "NVML not responding" until it returns.

For a sample (``{"sample": N}``) each watched GPU is read in a thread of its own
(``gpu_stats.read_stats``), and one ``StatsSample`` answers with those that answered within
SAMPLE_WINDOW; a GPU whose read has not returned is left out of that sample and of the next ones
until it does, and its read, like every call, has the deadline. Nothing is read for statistics
unless asked.

Each watched GPU's health conditions are read every ``health_interval`` (0: never) in a task of
their own beside its event wait (``health.HealthReader``, in a worker thread under the
deadline); the conditions go to the daemon when they change, and once at each watch's start so
that one that ended meanwhile (a reset) is not kept. Nothing else is sent, so a quiet GPU costs
the reads and nothing downstream.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import pynvml
import trio

from monitor.core.events import (
    GpuConditions,
    MigLayoutSeen,
    NvmlEventReported,
    NvmlGpu,
    NvmlGpuSeen,
    NvmlReachable,
    NvmlUnreachable,
    XidReported,
)
from monitor.core.mig import MigLayout
from monitor.outputs.logs import MESSAGE_IDS
from monitor.sources.nvml_worker.attributes import read_gpu
from monitor.sources.nvml_worker.events import MigConfigChanged, translate, watch_events
from monitor.sources.nvml_worker.gpu_stats import read_stats
from monitor.sources.nvml_worker.health import Conditions, HealthReader
from monitor.sources.nvml_worker.library import GPU_IS_LOST, NOT_FOUND, TIMEOUT, error_code, is_lost
from monitor.sources.nvml_worker.mig import read_layout
from monitor.sources.nvml_worker.pipe import (
    SAMPLE_WINDOW,
    NotFound,
    Output,
    Stats,
    StatsSample,
)

log = logging.getLogger("monitor.sources.nvml_worker")  # one name for the whole worker

T = TypeVar("T")
Send = trio.MemorySendChannel[Output]

WAIT_MS = 500  # one nvmlEventSetWait_v2 call; short, so that a cancelled wait ends soon
RETRY_SECONDS = 5.0  # between attempts to reach a GPU that NVML could not


class NotEnumerated(Exception):
    """The handle lookup failed: this init's enumeration has no such GPU, or a lost one."""


class NvmlSource:
    def __init__(
        self,
        send: Send,
        *,
        deadline: float,
        limiter: trio.CapacityLimiter,
        health_interval: float = 0.0,
    ) -> None:
        self.send = send
        self.deadline = deadline
        self.health_interval = health_interval
        self.unsupported: dict[str, set[str]] = {}  # per GPU watched: health reads it lacks
        self.limiter = limiter
        self.watching: dict[str, trio.CancelScope] = {}
        self.nursery: trio.Nursery | None = None  # the GPU tasks' and their call watchers'
        self.handles: dict[str, Any] = {}  # the GPUs watched now, for their statistics
        self.sampling: set[str] = set()  # GPUs whose statistics read has not returned yet
        self.layouts: dict[str, MigLayout] = {}  # the MIG layout last sent, per GPU watched
        self.mig_wanted: dict[str, trio.Event] = {}  # set: read that GPU's layout again

    def rescan_mig(self) -> None:
        """Read every watched GPU's MIG layout again (SIGHUP)."""
        for wanted in self.mig_wanted.values():
            wanted.set()

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
                    self.unsupported.pop(address, None)
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
                except NotEnumerated as exc:
                    # the daemon says why, once, after a fresh enumeration did not help either
                    cause = exc.__cause__
                    log.debug("%s: NVML's handle lookup failed: %s", address, cause)
                    lost = cause is not None and is_lost(cause)
                    await self.send.send(NotFound(address, f"NVML: {cause}", lost=lost))
                except (pynvml.NVMLError, RuntimeError) as exc:
                    lost = is_lost(exc)
                    reason = (
                        "GPU has fallen off the bus (NVML: GPU is lost)"
                        if lost
                        else f"NVML cannot watch this GPU: {exc}"
                    )
                    log.error("%s: %s", address, reason)
                    await self.send.send(NvmlUnreachable(address, reason, lost=lost))
                await trio.sleep(RETRY_SECONDS)

    async def _watch_once(self, address: str) -> None:
        try:
            handle = await self.call(address, pynvml.nvmlDeviceGetHandleByPciBusId, address)
        except pynvml.NVMLError as exc:
            if error_code(exc) in (NOT_FOUND, GPU_IS_LOST):
                raise NotEnumerated() from exc
            raise
        gpu = await self.call(address, read_gpu, address, handle)
        events = await self.call(address, watch_events, handle)
        health, mig = trio.CancelScope(), trio.CancelScope()
        try:
            await self.send.send(NvmlGpuSeen(gpu))
            self.layouts.pop(address, None)  # sent afresh with each watch
            self.mig_wanted[address] = trio.Event()  # set by a change from now on
            await self._send_layout(address, handle)
            await self.send.send(NvmlReachable(address))
            self.handles[address] = handle
            assert self.nursery is not None
            self.nursery.start_soon(self._watch_mig, address, handle, mig)
            log.info("%s: watching %s (%s) through NVML", address, gpu.name, gpu.uuid)
            if self.health_interval > 0:
                assert self.nursery is not None
                self.nursery.start_soon(self._watch_health, address, handle, health)
            while True:
                try:
                    wait = pynvml.nvmlEventSetWait_v2
                    data = await self.call(address, wait, events, WAIT_MS, waits=WAIT_MS / 1000)
                except pynvml.NVMLError as exc:
                    if error_code(exc) == TIMEOUT:
                        continue
                    raise
                event = translate(address, data)
                if isinstance(event, MigConfigChanged):
                    if address in self.mig_wanted:
                        self.mig_wanted[address].set()
                    continue
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
            health.cancel()
            mig.cancel()
            if self.handles.get(address) is handle:
                del self.handles[address]
            with trio.CancelScope(shield=True), trio.move_on_after(self.deadline):
                await trio.to_thread.run_sync(
                    pynvml.nvmlEventSetFree, events, abandon_on_cancel=True
                )

    async def _send_layout(self, address: str, handle: Any) -> None:
        """Read the GPU's MIG layout; send it when it changed."""
        layout = await self.call(address, read_layout, handle)
        if self.layouts.get(address) != layout:
            self.layouts[address] = layout
            count = len(layout.instances)
            log.info(
                "%s: MIG mode %s, %d MIG devices", address, "on" if layout.enabled else "off", count
            )
            await self.send.send(MigLayoutSeen(address, layout))

    async def _watch_mig(self, address: str, handle: Any, scope: trio.CancelScope) -> None:
        """Read the MIG layout again when NVML says it changed, on SIGHUP, and every
        ``health_interval`` (where NVML does not say). A read that fails leaves the last one
        standing (the event wait finds a lost GPU)."""
        with scope:
            wanted = self.mig_wanted[address]
            while True:
                with trio.move_on_after(self.health_interval or math.inf):
                    await wanted.wait()
                wanted = self.mig_wanted[address] = trio.Event()  # a change from now on
                try:
                    await self._send_layout(address, handle)
                except pynvml.NVMLError as exc:
                    log.debug("%s: MIG layout not read: %s", address, exc)

    async def _watch_health(self, address: str, handle: Any, scope: trio.CancelScope) -> None:
        """Read the GPU's health conditions every interval; send them when they change. A read
        that fails leaves the last ones standing (the event wait finds a lost GPU, and a call
        past the deadline marks the GPU not responding)."""
        reader = HealthReader(handle, self.unsupported.setdefault(address, set()))
        last: Conditions | None = None
        with scope:
            while True:
                try:
                    found = await self.call(address, reader.read)
                except pynvml.NVMLError as exc:
                    log.debug("%s: health conditions not read: %s", address, exc)
                else:
                    if found != last:
                        if found or last:
                            named = ", ".join(sorted(found)) or "none"
                            log.warning("%s: NVML health conditions now: %s", address, named)
                        await self.send.send(GpuConditions(address, found))
                        last = found
                await trio.sleep(self.health_interval)

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
                    "XID_SOURCE": "nvml",
                }
            },
        )

"""Device statistics for ``stats`` subscribers, and the daemon's own counters for ``status``.

Statistics are measurements, not state: they never go through the reducer or the fingerprint.
Nothing is read unless a connection asks. Each subscriber's notifications fall on multiples of
its interval on one clock, so subscribers with the same interval (or intervals that divide
each other) share one sample: a sample already taken or being taken less than FRESH_SECONDS
ago serves every subscriber that asks, however many there are. A sample reads every source at
once: NVML through its worker (``monitor.sources.nvml.NvmlStats``), the kernel's sysfs in a
thread (``monitor.sources.sysfs_stats``).
"""

from __future__ import annotations

import bisect
import functools
import importlib.metadata
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import attrs
import trio

from monitor.core.rules.sharing import measured, sysfs_measured
from monitor.core.state import State
from monitor.engine.hub import Hub
from monitor.sources import sysfs_stats
from monitor.sources.counts import SourceCounts
from monitor.wire import stats
from monitor.wire.framing import dumps

Sample = dict[str, dict[str, dict[str, Any]]]  # device ID -> stat name -> {"value", "unit"}
Sampler = Callable[[State], Awaitable[Sample]]

FRESH_SECONDS = 0.5  # a sample younger than this serves whoever asks (less than any interval)


class Histogram:
    """Observations counted into fixed buckets (upper bounds, seconds), as Prometheus keeps
    them: cumulative counts per bound, their sum and count."""

    def __init__(self, bounds: Iterable[float] = stats.LATENCY_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self._counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def to_json(self) -> dict[str, Any]:
        cumulative, total = [], 0
        for bound, count in zip(self.bounds, self._counts, strict=False):
            total += count
            cumulative.append([bound, total])
        return {"buckets": cumulative, "sum": self.sum, "count": self.count}


def clean(sample: Sample, present: Iterable[str]) -> Sample:
    """Only devices the daemon shows, only statistics it knows, only numbers or text: the
    worker loads a vendor library, and what it writes is checked like any input."""
    known = set(present)
    cleaned: Sample = {}
    for device_id, found in sample.items():
        if device_id not in known or not isinstance(found, dict):
            continue
        entries = {}
        for name, entry in found.items():
            stat = stats.BY_NAME.get(name)
            value = entry.get("value") if isinstance(entry, dict) else None
            if stat is None or isinstance(value, bool):
                continue
            if stat.kind == stats.TEXT:
                if isinstance(value, str) and len(value) <= 1024:
                    entries[name] = stat.value(value)
            elif isinstance(value, int | float) and math.isfinite(value):
                entries[name] = stat.value(value)
        if entries:
            cleaned[device_id] = entries
    return cleaned


def sysfs_sampler(root: str = sysfs_stats.PCI_DEVICES) -> Sampler:
    """Statistics of the devices NVML does not read (the core's ``sysfs_measured``), from
    sysfs, in a thread."""

    async def sample(state: State) -> Sample:
        addresses = sysfs_measured(state)
        if not addresses:
            return {}
        return await trio.to_thread.run_sync(sysfs_stats.read_devices, addresses, root)

    return sample


@attrs.frozen
class Taken:
    """One sample: its params and their JSON, encoded once for every subscriber."""

    at: float  # trio's clock, when it was begun
    params: dict[str, Any]
    encoded: bytes


class StatsHub:
    """Samples on demand, shared between the subscribers who ask at about the same time."""

    def __init__(
        self,
        hub: Hub,
        samplers: Iterable[Sampler],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.hub = hub
        self.samplers = tuple(samplers)
        self.clock = clock
        self.subscribers = 0
        self.samples_taken = 0
        self._latest: Taken | None = None
        self._taking: trio.Event | None = None
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the nursery samples are taken in, so that none is lost with the connection
        that asked first."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def sample(self) -> Taken:
        """A sample no older than FRESH_SECONDS: the latest, the one being taken, or a new one."""
        while True:
            latest = self._latest
            if latest is not None and trio.current_time() - latest.at < FRESH_SECONDS:
                return latest
            if self._taking is None:
                self._taking = trio.Event()
                assert self._nursery is not None, "StatsHub.run must be running"
                self._nursery.start_soon(self._take, self._taking)
            await self._taking.wait()
            if self._latest is not None and self._latest is not latest:
                return self._latest

    async def _take(self, done: trio.Event) -> None:
        try:
            begun, wall = trio.current_time(), self.clock()
            state = self.hub.state
            found: Sample = {}
            results: list[Sample] = [{} for _ in self.samplers]

            async def run(index: int, sampler: Sampler) -> None:
                results[index] = await sampler(state)

            async with trio.open_nursery() as nursery:
                for index, sampler in enumerate(self.samplers):
                    nursery.start_soon(run, index, sampler)
            for result in results:
                for device_id, entries in result.items():
                    found.setdefault(device_id, {}).update(entries)
            devices = clean(found, measured(state))
            params = {"time": round(wall, 3), "devices": devices}
            self._latest = Taken(begun, params, dumps(params))
            self.samples_taken += 1
        finally:
            self._taking = None
            done.set()

    async def stream(
        self, interval: float, send: Callable[[bytes], Awaitable[None]], first_at: float
    ) -> None:
        """Send a sample at each multiple of ``interval`` on trio's clock, the first at least
        half an interval after ``first_at`` (when the answer went out), until cancelled.
        ``send`` gets each sample's params as JSON; a tick missed while it waits is skipped."""
        self.subscribers += 1
        try:
            tick = math.ceil((first_at + interval / 2) / interval) * interval
            while True:
                await trio.sleep_until(tick)
                await send((await self.sample()).encoded)
                now = trio.current_time()
                tick += interval
                if tick <= now:  # the client read slowly: carry on from the next tick ahead
                    tick = math.floor(now / interval) * interval + interval
        finally:
            self.subscribers -= 1


@functools.cache
def daemon_version() -> str:
    try:
        return importlib.metadata.version("hotplug-monitor")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        return "unknown"


def status(
    hub: Hub,
    stats_hub: StatsHub | None,
    counts: SourceCounts,
    latency: Histogram,
    started: float,
) -> dict[str, Any]:
    """The ``status`` method's answer: the daemon's own counters."""
    state = hub.state
    return {
        "version": daemon_version(),
        "started": started,
        "generation": state.generation,
        "devices": len(state.fingerprint.devices()),
        "uevents": counts.uevents,
        "resyncs": dict(counts.resyncs),
        "subscribers": len(hub.subscribers),
        "stats_subscribers": stats_hub.subscribers if stats_hub is not None else 0,
        "leases": len(state.leases),
        "nvml_worker_restarts": counts.nvml_worker_restarts,
        "kmsg_records": counts.kmsg_records,
        "kmsg_ignored": counts.kmsg_ignored,
        "kmsg_missed": counts.kmsg_missed,
        "publish_latency_seconds": latency.to_json(),
    }


@attrs.define
class Telemetry:
    """What ``stats`` and ``status`` answer from: the samples, and the counters."""

    stats: StatsHub
    counts: SourceCounts = attrs.field(factory=SourceCounts)
    latency: Histogram = attrs.field(factory=Histogram)
    started: float = attrs.field(factory=time.time)

    def status(self) -> dict[str, Any]:
        return status(self.stats.hub, self.stats, self.counts, self.latency, self.started)

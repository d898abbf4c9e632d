"""What the exporter knows of the daemon: the last snapshot, sample and counters it was sent.

Plain data, no I/O: the tasks that follow the daemon write here as answers come, and a scrape
reads what is here, never waiting on the daemon. Everything the daemon sends is checked before
it is kept (types, sizes, finite numbers): a daemon that misbehaves yields fewer series, never
a broken exposition or an exporter that grows without bound.
"""

from __future__ import annotations

import math
import re
from typing import Any

import attrs

from monitor.wire import stats
from monitor.wire.conditions import ATTRIBUTE, parse_conditions
from monitor.wire.mirror import Mirror
from monitor.wire.snapshot import (
    MIG_PROFILE,
    MIG_UUID,
    PCI_ADDRESS,
    is_mig_type,
    shared_replica_of,
)

MAX_DEVICES = 4096
MAX_TEXT = 256  # a label value
MAX_XIDS = 64  # distinct XIDs (and sources) counted per device
XID_SOURCES = ("nvml", "kmsg")
_XID_LIMIT = 1 << 20


def text(value: Any) -> str:
    """A label value: printable, bounded; "" for anything that is not text or a number."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return ""
    return "".join(ch for ch in str(value)[:MAX_TEXT] if ch.isprintable())


def number(value: Any) -> float | None:
    """A finite number, or None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _attribute(device: dict[str, Any], name: str) -> Any:
    attribute = device.get("attributes", {}).get(name)
    return attribute.get("value") if isinstance(attribute, dict) else None


@attrs.frozen
class DeviceView:
    """One device as the exporter shows it."""

    id: str
    group: str
    vendor: str
    type: str
    name: str
    driver: str
    numa_node: str
    uuid: str
    healthy: bool
    present: bool  # False: a reserved device that left the host (the daemon keeps it shown)
    reserved: bool
    owner: str
    xid_count: int | None
    last_xid: int | None
    last_xid_source: str  # who reported it: "nvml" or "kmsg"
    xid_action: str = ""  # NVIDIA's catalog action for last_xid, as the daemon names it
    health: str = "healthy"  # or "needs reset", "unhealthy"
    conditions: tuple[tuple[str, str], ...] = ()  # health conditions NVML reports: (name, verdict)
    mig_profile: str = ""  # a MIG instance's (or its replica's) profile; "" for other devices
    parent_uuid: str = ""  # a MIG instance's GPU's UUID; "" for other devices

    @classmethod
    def of(cls, device_id: str, group_key: str, group: Any, device: Any) -> DeviceView | None:
        if not isinstance(group, dict) or not isinstance(device, dict):
            return None
        xid_count, last_xid = _attribute(device, "xid_count"), _attribute(device, "last_xid")
        attributes = device.get("attributes")
        mig = is_mig_type(str(group.get("type")))
        profile = _attribute(device, "mig_profile") if mig else None
        parent = _attribute(device, "parent_uuid") if mig else None
        return cls(
            id=text(device_id),
            group=text(group_key),
            vendor=text(group.get("vendor")),
            type=text(group.get("type")),
            name=text(group.get("name")),
            driver=text(_attribute(device, "driver")),
            numa_node=text(_attribute(device, "numa_node")),
            uuid=text(_attribute(device, "uuid")),
            healthy=device.get("healthy") is True,
            present=isinstance(attributes, dict) and bool(attributes),
            reserved=isinstance(device.get("reserved_by"), str),
            owner=text(device.get("reserved_owner")),
            xid_count=xid_count if _small_int(xid_count) else None,
            last_xid=last_xid if _small_int(last_xid) else None,
            last_xid_source=_xid_source(_attribute(device, "last_xid_source")),
            xid_action=text(_attribute(device, "last_xid_action")),
            health=_health(device),
            conditions=tuple(sorted(parse_conditions(_attribute(device, ATTRIBUTE)).items())),
            mig_profile=profile
            if isinstance(profile, str) and MIG_PROFILE.fullmatch(profile)
            else "",
            parent_uuid=text(parent),
        )


def _health(device: dict[str, Any]) -> str:
    if device.get("healthy") is True:
        return "healthy"
    return "needs reset" if device.get("health") == "needs reset" else "unhealthy"


def _xid_source(value: Any) -> str:
    """A daemon that does not say had NVML as its only source of XIDs."""
    return value if value in XID_SOURCES else "nvml"


def _small_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _XID_LIMIT


class Known:
    """The exporter's picture of the daemon, as of the last answers."""

    def __init__(self) -> None:
        self.up = False  # the snapshot connection is open
        self.ever_up = False
        self.devices: dict[str, DeviceView] = {}
        # XIDs counted since the exporter began, by XID, the catalog's action and the source
        self.xids: dict[str, dict[tuple[int, str, str], int]] = {}
        self.sample: dict[str, dict[str, float | str]] = {}  # device -> stat name -> value
        # the GPUs (by PCI address) and MIG instances shown as replicas
        self.shared: set[str] = set()
        self.sample_time: float | None = None
        self.status: dict[str, Any] | None = None
        self.daemon: DaemonCounters | None = None  # the status answer, checked

    # --- the snapshot ---

    def snapshot(self, mirror: Mirror | None) -> None:
        """The daemon's devices now; None when it cannot be reached: the last known are kept
        (and shown stale), telemetry and counters are dropped."""
        if mirror is None:
            self.up = False
            self.sample, self.sample_time, self.status = {}, None, None
            self.daemon = None
            return
        self.up = self.ever_up = True
        devices: dict[str, DeviceView] = {}
        groups = mirror.snapshot.get("groups")
        for key, group in (groups if isinstance(groups, dict) else {}).items():
            members = group.get("devices") if isinstance(group, dict) else None
            for device_id, device in (members if isinstance(members, dict) else {}).items():
                usable = (
                    PCI_ADDRESS.fullmatch(str(device_id))
                    or MIG_UUID.fullmatch(str(device_id))
                    or shared_replica_of(str(device_id))
                )
                if len(devices) >= MAX_DEVICES or not usable:
                    continue
                view = DeviceView.of(device_id, key, group, device)
                if view is not None:
                    devices[view.id] = view
        for device_id, view in devices.items():
            self._count_xids(self.devices.get(device_id), view)
        for gone in set(self.xids) - set(devices):
            del self.xids[gone]
        self.devices = devices
        self.shared = {r[0] for i in devices if (r := shared_replica_of(i)) is not None}

    def _count_xids(self, before: DeviceView | None, now: DeviceView) -> None:
        """Each XID the daemon counted since we last looked is taken as the last one it names:
        exact when XIDs come one patch at a time, as they do unless several land together."""
        if now.xid_count is None or now.last_xid is None:
            return
        seen = before.xid_count if before is not None and before.xid_count is not None else 0
        if now.xid_count < seen:  # the daemon restarted: its count began again
            seen = 0
        if now.xid_count == seen:
            return
        counts = self.xids.setdefault(now.id, {})
        key = (now.last_xid, now.xid_action, now.last_xid_source)
        if key in counts or len(counts) < MAX_XIDS:
            counts[key] = counts.get(key, 0) + now.xid_count - seen

    @property
    def stale(self) -> bool:
        return not self.up

    # --- telemetry and counters ---

    def stats(self, params: Any) -> None:
        """A ``stats`` sample (its answer or a notification)."""
        if not isinstance(params, dict) or not isinstance(params.get("devices"), dict):
            return
        sample: dict[str, dict[str, float | str]] = {}
        for device_id, found in params["devices"].items():
            known = device_id in self.devices or device_id in self.shared
            if not known or not isinstance(found, dict):
                continue
            values: dict[str, float | str] = {}
            for name, entry in found.items():
                stat = stats.BY_NAME.get(name)
                if stat is None or not isinstance(entry, dict):
                    continue
                if stat.kind == stats.TEXT:
                    if isinstance(entry.get("value"), str):
                        values[name] = text(entry["value"])
                elif (value := number(entry.get("value"))) is not None:
                    values[name] = value
            sample[device_id] = values
        self.sample = sample
        self.sample_time = number(params.get("time"))

    def telemetry(self, device_id: str) -> dict[str, float | str]:
        """A device's last sample. A shared GPU's (or MIG instance's) is shown once, on its
        replica 0, so that a sum over devices (power, memory) counts each once."""
        replica = shared_replica_of(device_id)
        if replica is None:
            return self.sample.get(device_id, {})
        return self.sample.get(replica[0], {}) if replica[1] == 0 else {}

    def no_stats(self) -> None:
        self.sample, self.sample_time = {}, None

    def counters(self, result: Any) -> None:
        """A ``status`` answer; kept only if it has the shape the protocol gives it."""
        self.status = result if isinstance(result, dict) else None
        self.daemon = DaemonCounters.of(result)

    def no_counters(self) -> None:
        self.status = None
        self.daemon = None


@attrs.frozen
class Histogram:
    """Cumulative bucket counts by upper bound (ascending), the sum and the count."""

    buckets: tuple[tuple[float, int], ...]
    sum: float
    count: int

    @classmethod
    def of(cls, value: Any) -> Histogram | None:
        """None unless ``value`` is a histogram as the daemon sends one: finite ascending
        bounds, counts that never fall, at most MAX_BUCKETS of them."""
        if not isinstance(value, dict) or not isinstance(value.get("buckets"), list):
            return None
        total, count = number(value.get("sum")), _count(value.get("count"))
        if total is None or count is None or len(value["buckets"]) > MAX_BUCKETS:
            return None
        buckets: list[tuple[float, int]] = []
        for entry in value["buckets"]:
            if not isinstance(entry, list) or len(entry) != 2:
                return None
            bound, below = number(entry[0]), _count(entry[1])
            if bound is None or below is None:
                return None
            if buckets and (bound <= buckets[-1][0] or below < buckets[-1][1]):
                return None
            buckets.append((bound, below))
        if buckets and buckets[-1][1] > count:
            return None
        return cls(tuple(buckets), total, count)


MAX_BUCKETS = 64
MAX_CAUSES = 16


def _count(value: Any) -> int | None:
    """A non-negative integer (a counter's value, a number of things), or None."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 63:
        return None
    return value


@attrs.frozen
class DaemonCounters:
    """The daemon's own counters, from its ``status`` answer; None where one is missing or
    not what the protocol says it is (a number of things, a finite time)."""

    started: float | None
    generation: int | None
    uevents: int | None
    resyncs: dict[str, int]  # by cause
    subscribers: int | None
    stats_subscribers: int | None
    leases: int | None
    nvml_worker_restarts: int | None
    publish_latency: Histogram | None

    @classmethod
    def of(cls, result: Any) -> DaemonCounters | None:
        if not isinstance(result, dict):
            return None
        resyncs = result.get("resyncs")
        causes: dict[str, int] = {}
        for cause, times in (resyncs if isinstance(resyncs, dict) else {}).items():
            value = _count(times)
            if len(causes) < MAX_CAUSES and _CAUSE.fullmatch(str(cause)) and value is not None:
                causes[cause] = value
        return cls(
            started=number(result.get("started")),
            generation=_count(result.get("generation")),
            uevents=_count(result.get("uevents")),
            resyncs=causes,
            subscribers=_count(result.get("subscribers")),
            stats_subscribers=_count(result.get("stats_subscribers")),
            leases=_count(result.get("leases")),
            nvml_worker_restarts=_count(result.get("nvml_worker_restarts")),
            publish_latency=Histogram.of(result.get("publish_latency_seconds")),
        )


_CAUSE = re.compile(r"[a-z][a-z0-9_]{0,31}")

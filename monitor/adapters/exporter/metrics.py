"""The metrics the exporter serves, each named once here, and their exposition.

``METRICS`` is the one list of names, kinds, labels and help texts: the collector emits only
what it names, docs/prometheus.md's table is checked against it, and the daemon's statistics
(``monitor.wire.stats``) map onto it through ``TELEMETRY``, converted to Prometheus's base
units (ratios, bytes, hertz, watts, joules, celsius). Labels are few and bounded: a device is
its ID (``device``: a PCI address, a MIG instance's MIG UUID, a replica's ID) on every
per-device series, and what describes it is on ``hotplug_monitor_device_info`` alone, to be
joined on ``device`` where wanted: a MIG instance's profile (``mig_profile``) and GPU
(``parent_uuid``) too, empty for other devices, as Prometheus's info-metric convention has it.

The text is made by ``prometheus_client``'s own exposition code from a custom collector over
``Known``: nothing here waits on the daemon.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import attrs
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest

from monitor.adapters.exporter.known import DeviceView, Known
from monitor.wire import stats

# The text format generate_latest writes, which Prometheus 2.x reads; named here rather than
# imported because prometheus_client's own constant for it is recent (and its LATEST moved on).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "hotplug_monitor_"
GAUGE, COUNTER, HISTOGRAM = "gauge", "counter", "histogram"


@attrs.frozen
class Spec:
    """One metric as it is exposed: its full name (counters end in ``_total``), kind, labels."""

    name: str
    kind: str
    help: str
    labels: tuple[str, ...] = ()


def _spec(name: str, kind: str, help: str, *labels: str) -> Spec:
    return Spec(PREFIX + name, kind, help, labels)


UP = _spec(
    "up",
    GAUGE,
    "1 while the exporter is subscribed to the daemon; 0 while the daemon cannot be reached "
    "(the devices are then the last known, marked stale)",
)
START_TIME = _spec("daemon_start_time_seconds", GAUGE, "when the daemon started (Unix time)")
GENERATION = _spec("generation", GAUGE, "the fingerprint's generation: it grows at each change")
UEVENTS = _spec("uevents_total", COUNTER, "uevents the daemon read from the kernel or udevd")
RESYNCS = _spec(
    "resyncs_total",
    COUNTER,
    "full rereads of sysfs, by cause (start; overflow: the kernel dropped uevents)",
    "cause",
)
SUBSCRIBERS = _spec("subscribers", GAUGE, "connections subscribed to the daemon's changes")
STATS_SUBSCRIBERS = _spec("stats_subscribers", GAUGE, "connections receiving device statistics")
LEASES = _spec("leases", GAUGE, "leases (reservations of devices) the daemon holds")
NVML_RESTARTS = _spec(
    "nvml_worker_restarts_total", COUNTER, "NVML worker processes started again after one died"
)
PUBLISH_LATENCY = _spec(
    "publish_latency_seconds",
    HISTOGRAM,
    "from reading an event to publishing the change it made, in the daemon",
)
STATS_TIME = _spec(
    "stats_timestamp_seconds", GAUGE, "when the latest device statistics were sampled (Unix time)"
)

DEVICE = "device"  # the label every per-device series has: the daemon's device ID
INFO = _spec(
    "device_info",
    GAUGE,
    "a device the daemon follows, always 1: its group, vendor, type, name, driver, NUMA node, "
    "GPU UUID, and a MIG instance's profile and GPU's UUID (empty where unknown or not MIG)",
    DEVICE,
    "group",
    "vendor",
    "type",
    "name",
    "driver",
    "numa_node",
    "uuid",
    "mig_profile",
    "parent_uuid",
)
HEALTHY = _spec("device_healthy", GAUGE, "1 when the device is healthy, else 0", DEVICE)
PRESENT = _spec(
    "device_present",
    GAUGE,
    "1 when the device is on the host; 0 for a reserved device that left it",
    DEVICE,
)
STALE = _spec(
    "device_stale",
    GAUGE,
    "1 when this is the last known state of the device, the daemon being unreachable",
    DEVICE,
)
RESERVED = _spec(
    "device_reserved",
    GAUGE,
    "1 when the device is reserved, with the lease's owner (empty: a lease without one)",
    DEVICE,
    "owner",
)
XIDS = _spec(
    "device_xids_total",
    COUNTER,
    "NVIDIA XID errors reported for the device, by XID, NVIDIA's catalog action "
    "(NOT_IN_CATALOG for others) and who reported it first (nvml, or kmsg: the driver's kernel "
    "log lines), since the exporter started",
    DEVICE,
    "xid",
    "action",
    "source",
)
HEALTH = _spec(
    "device_health",
    GAUGE,
    "1 for the device's health state: healthy, needs reset (no new leases, current ones "
    "kept) or unhealthy",
    DEVICE,
    "state",
)
CONDITION = _spec(
    "device_health_condition",
    GAUGE,
    "1 for each health condition NVML reports for the GPU now (row remapping, page retirement, "
    "ECC, PCIe replays, clock slowdowns, NVLink), with the daemon's verdict on it: reported, "
    "needs reset or unhealthy (replace the GPU)",
    DEVICE,
    "condition",
    "verdict",
)
THROTTLE = _spec(
    "device_clock_throttle_reason",
    GAUGE,
    "1 for each reason the GPU's clocks are held down now, else 0",
    DEVICE,
    "reason",
)


@attrs.frozen
class Telemetry:
    """How one of the daemon's statistics is exposed: which metric, with which extra label,
    multiplied by what to reach the base unit."""

    spec: Spec
    scale: float = 1.0
    label: tuple[str, str] | None = None  # (name, value)


def _gauge(name: str, help: str, *labels: str) -> Spec:
    return _spec(f"device_{name}", GAUGE, help, DEVICE, *labels)


def _counter(name: str, help: str, *labels: str) -> Spec:
    return _spec(f"device_{name}", COUNTER, help, DEVICE, *labels)


PERCENT, MIB, MHZ, KB = 0.01, float(1 << 20), 1e6, 1e3

_ECC_LOCATION = _counter(
    "ecc_uncorrected_errors_by_location_total",
    "uncorrected ECC errors since boot, by location (l1, l2, memory)",
    "location",
)
_ECC_VOLATILE = _counter(
    "ecc_volatile_errors_total",
    "ECC errors since the driver was loaded, by severity (corrected, uncorrected)",
    "severity",
)
_ECC_AGGREGATE = _counter(
    "ecc_aggregate_errors_total",
    "ECC errors over the GPU's life, by severity (corrected, uncorrected)",
    "severity",
)
_RETIRED = _counter(
    "retired_pages_total", "memory pages retired, by cause (single_bit, double_bit)", "cause"
)
_REMAPPED = _counter(
    "remapped_rows_total",
    "memory rows remapped, by cause (correctable, uncorrectable)",
    "cause",
)

TELEMETRY: dict[str, Telemetry] = {
    stats.GPU_UTILIZATION.name: Telemetry(
        _gauge("gpu_utilization_ratio", "time the GPU was busy, of the last sampling period"),
        PERCENT,
    ),
    stats.MEMORY_UTILIZATION.name: Telemetry(
        _gauge("memory_bandwidth_utilization_ratio", "memory bandwidth used, of the last period"),
        PERCENT,
    ),
    stats.ENCODER_UTILIZATION.name: Telemetry(
        _gauge("encoder_utilization_ratio", "time the video encoder was busy"), PERCENT
    ),
    stats.DECODER_UTILIZATION.name: Telemetry(
        _gauge("decoder_utilization_ratio", "time the video decoder was busy"), PERCENT
    ),
    stats.TEMPERATURE.name: Telemetry(_gauge("temperature_celsius", "GPU temperature")),
    stats.TEMPERATURE_LIMIT.name: Telemetry(
        _gauge(
            "temperature_limit_celsius",
            "temperature at which the GPU slows down (NVML) or is critical (sysfs)",
        )
    ),
    stats.POWER_USAGE.name: Telemetry(_gauge("power_watts", "power drawn by the GPU")),
    stats.ENERGY.name: Telemetry(
        _counter("energy_joules_total", "energy used since the driver was loaded")
    ),
    stats.MEMORY_USED.name: Telemetry(_gauge("memory_used_bytes", "device memory in use"), MIB),
    stats.MEMORY_FREE.name: Telemetry(_gauge("memory_free_bytes", "device memory free"), MIB),
    stats.MEMORY_TOTAL.name: Telemetry(_gauge("memory_size_bytes", "device memory"), MIB),
    stats.BAR1_USED.name: Telemetry(_gauge("bar1_used_bytes", "BAR1 aperture in use"), MIB),
    stats.BAR1_TOTAL.name: Telemetry(_gauge("bar1_size_bytes", "BAR1 aperture"), MIB),
    stats.SM_CLOCK.name: Telemetry(
        _gauge("sm_clock_hertz", "streaming multiprocessor (graphics) clock"), MHZ
    ),
    stats.MEMORY_CLOCK.name: Telemetry(_gauge("memory_clock_hertz", "memory clock"), MHZ),
    stats.GPU_FREQUENCY.name: Telemetry(
        _gauge("gpu_clock_hertz", "the graphics clock the kernel reports (DRM sysfs)"), MHZ
    ),
    stats.PCIE_TX.name: Telemetry(
        _gauge("pcie_transmit_bytes_per_second", "PCIe bytes sent by the GPU, per second"), KB
    ),
    stats.PCIE_RX.name: Telemetry(
        _gauge("pcie_receive_bytes_per_second", "PCIe bytes received by the GPU, per second"), KB
    ),
    stats.ECC_L1.name: Telemetry(_ECC_LOCATION, label=("location", "l1")),
    stats.ECC_L2.name: Telemetry(_ECC_LOCATION, label=("location", "l2")),
    stats.ECC_MEMORY.name: Telemetry(_ECC_LOCATION, label=("location", "memory")),
    stats.ECC_VOLATILE_CORRECTED.name: Telemetry(_ECC_VOLATILE, label=("severity", "corrected")),
    stats.ECC_VOLATILE_UNCORRECTED.name: Telemetry(
        _ECC_VOLATILE, label=("severity", "uncorrected")
    ),
    stats.ECC_AGGREGATE_CORRECTED.name: Telemetry(_ECC_AGGREGATE, label=("severity", "corrected")),
    stats.ECC_AGGREGATE_UNCORRECTED.name: Telemetry(
        _ECC_AGGREGATE, label=("severity", "uncorrected")
    ),
    stats.RETIRED_PAGES_SBE.name: Telemetry(_RETIRED, label=("cause", "single_bit")),
    stats.RETIRED_PAGES_DBE.name: Telemetry(_RETIRED, label=("cause", "double_bit")),
    stats.RETIRED_PAGES_PENDING.name: Telemetry(
        _gauge("retired_pages_pending", "1 when a page waits to be retired at the next reset")
    ),
    stats.REMAPPED_ROWS_CORRECTABLE.name: Telemetry(_REMAPPED, label=("cause", "correctable")),
    stats.REMAPPED_ROWS_UNCORRECTABLE.name: Telemetry(_REMAPPED, label=("cause", "uncorrectable")),
    stats.REMAPPED_ROWS_PENDING.name: Telemetry(
        _gauge("remapped_rows_pending", "1 when a row remapping waits for the next reset")
    ),
    stats.REMAPPED_ROWS_FAILED.name: Telemetry(
        _gauge("remapped_rows_failed", "1 when a row remapping failed (the GPU needs service)")
    ),
}
# THROTTLE_REASONS, the one text statistic, becomes THROTTLE's series, one per known reason.

DAEMON = (
    UP,
    START_TIME,
    GENERATION,
    UEVENTS,
    RESYNCS,
    SUBSCRIBERS,
    STATS_SUBSCRIBERS,
    LEASES,
    NVML_RESTARTS,
    PUBLISH_LATENCY,
    STATS_TIME,
)
DEVICES = (INFO, HEALTHY, HEALTH, CONDITION, PRESENT, STALE, RESERVED, XIDS)


def _unique(specs: Iterable[Spec]) -> tuple[Spec, ...]:
    return tuple({spec.name: spec for spec in specs}.values())


METRICS: tuple[Spec, ...] = _unique(
    (*DAEMON, *DEVICES, *(t.spec for t in TELEMETRY.values()), THROTTLE)
)


def _family(spec: Spec) -> Metric:
    labels = list(spec.labels)
    if spec.kind == COUNTER:
        return CounterMetricFamily(spec.name, spec.help, labels=labels)
    if spec.kind == HISTOGRAM:
        return HistogramMetricFamily(spec.name, spec.help, labels=labels)
    return GaugeMetricFamily(spec.name, spec.help, labels=labels)


class Families:
    """One family per metric, filled as the collector goes; empty ones are left out."""

    def __init__(self) -> None:
        self._families: dict[str, Metric] = {}

    def add(self, spec: Spec, labels: Iterable[str], value: float) -> None:
        family = self._families.get(spec.name)
        if family is None:
            family = self._families[spec.name] = _family(spec)
        assert isinstance(family, GaugeMetricFamily | CounterMetricFamily)
        family.add_metric(list(labels), value)

    def histogram(self, spec: Spec, buckets: list[tuple[str, float]], total: float) -> None:
        family = HistogramMetricFamily(spec.name, spec.help, labels=list(spec.labels))
        family.add_metric([], buckets, total)
        self._families[spec.name] = family

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._families.values())


class Collector:
    """``prometheus_client``'s custom collector over what the exporter knows."""

    def __init__(self, known: Known) -> None:
        self.known = known

    def collect(self) -> Iterator[Metric]:
        known, out = self.known, Families()
        out.add(UP, [], 1.0 if known.up else 0.0)
        _daemon(known, out)
        for _, view in sorted(known.devices.items()):
            _device(known, view, out)
        if known.sample_time is not None:
            out.add(STATS_TIME, [], known.sample_time)
        return iter(out)


def _daemon(known: Known, out: Families) -> None:
    counters = known.daemon
    if counters is None:
        return
    for spec, value in (
        (START_TIME, counters.started),
        (GENERATION, counters.generation),
        (UEVENTS, counters.uevents),
        (SUBSCRIBERS, counters.subscribers),
        (STATS_SUBSCRIBERS, counters.stats_subscribers),
        (LEASES, counters.leases),
        (NVML_RESTARTS, counters.nvml_worker_restarts),
    ):
        if value is not None:
            out.add(spec, [], float(value))
    for cause, times in sorted(counters.resyncs.items()):
        out.add(RESYNCS, [cause], float(times))
    latency = counters.publish_latency
    if latency is not None:
        buckets = [(_bound(bound), float(below)) for bound, below in latency.buckets]
        out.histogram(PUBLISH_LATENCY, [*buckets, ("+Inf", float(latency.count))], latency.sum)


def _bound(bound: float) -> str:
    return repr(bound) if bound != int(bound) else f"{bound:.1f}"


def _device(known: Known, view: DeviceView, out: Families) -> None:
    device = [view.id]
    info = (
        view.group,
        view.vendor,
        view.type,
        view.name,
        view.driver,
        view.numa_node,
        view.uuid,
        view.mig_profile,
        view.parent_uuid,
    )
    out.add(INFO, [*device, *info], 1.0)
    out.add(HEALTHY, device, 1.0 if view.healthy else 0.0)
    for state in ("healthy", "needs reset", "unhealthy"):
        out.add(HEALTH, [*device, state], 1.0 if view.health == state else 0.0)
    for condition, verdict in view.conditions:
        out.add(CONDITION, [*device, condition, verdict], 1.0)
    out.add(PRESENT, device, 1.0 if view.present else 0.0)
    out.add(STALE, device, 1.0 if known.stale else 0.0)
    out.add(RESERVED, [*device, view.owner], 1.0 if view.reserved else 0.0)
    for (xid, action, source), times in sorted(known.xids.get(view.id, {}).items()):
        out.add(XIDS, [*device, str(xid), action, source], float(times))
    for name, value in known.telemetry(view.id).items():
        if name == stats.THROTTLE_REASONS.name:
            active = set(str(value).split(","))
            for reason in stats.THROTTLE_REASON_BITS:
                out.add(THROTTLE, [*device, reason], 1.0 if reason in active else 0.0)
            continue
        telemetry = TELEMETRY.get(name)
        if telemetry is None or isinstance(value, str):
            continue
        extra = [telemetry.label[1]] if telemetry.label else []
        out.add(telemetry.spec, [*device, *extra], value * telemetry.scale)


def render(known: Known) -> bytes:
    """The exposition of what ``known`` holds, in Prometheus's text format."""
    return generate_latest(Collector(known))

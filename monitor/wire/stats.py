"""The device statistics the ``stats`` method reports: each one's name, unit and kind, written
once for the daemon that samples them and the adapters that pass them on (Nomad, Prometheus);
and the shape of the ``status`` method's answer (the daemon's own counters).

Names follow Nomad's NVIDIA device plugin where it has one, so that what Nomad shows reads the
same; units are Nomad's. A statistic a device does not give is absent from its sample, never 0.
"""

from __future__ import annotations

from typing import Any

import attrs

GAUGE, COUNTER, TEXT = "gauge", "counter", "text"


@attrs.frozen
class Stat:
    name: str  # as it appears in a sample: {"devices": {ID: {NAME: {"value", "unit"}}}}
    unit: str  # Nomad's: "%", "C", "W", "J", "MiB", "MHz", "KB/s", "#"; "" for text
    help: str
    kind: str = GAUGE  # GAUGE; COUNTER: only grows (until the driver is reloaded); TEXT

    @property
    def counter(self) -> bool:
        return self.kind == COUNTER

    def value(self, value: float | int | str) -> dict[str, Any]:
        """This statistic's entry in a sample."""
        return {"value": value, "unit": self.unit}


# Nomad's NVIDIA plugin's names.
GPU_UTILIZATION = Stat("GPU utilization", "%", "time the GPU was busy, of the last period")
MEMORY_UTILIZATION = Stat("Memory utilization", "%", "memory bandwidth used, of the last period")
ENCODER_UTILIZATION = Stat("Encoder utilization", "%", "time the video encoder was busy")
DECODER_UTILIZATION = Stat("Decoder utilization", "%", "time the video decoder was busy")
TEMPERATURE = Stat("Temperature", "C", "GPU temperature")
POWER_USAGE = Stat("Power usage", "W", "power drawn by the GPU and its memory")
MEMORY_USED = Stat("Memory state", "MiB", "device memory in use (Nomad's numerator)")
BAR1_USED = Stat("BAR1 buffer state", "MiB", "BAR1 aperture in use (Nomad's numerator)")
ECC_L1 = Stat("ECC L1 errors", "#", "uncorrected ECC errors in L1 cache, since boot", COUNTER)
ECC_L2 = Stat("ECC L2 errors", "#", "uncorrected ECC errors in L2 cache, since boot", COUNTER)
ECC_MEMORY = Stat(
    "ECC memory errors", "#", "uncorrected ECC errors in device memory, since boot", COUNTER
)
# Ours, where Nomad has none.
MEMORY_FREE = Stat("Memory free", "MiB", "device memory free")
MEMORY_TOTAL = Stat("Memory total", "MiB", "device memory (Nomad's denominator)")
BAR1_TOTAL = Stat("BAR1 total", "MiB", "BAR1 aperture (Nomad's denominator)")
TEMPERATURE_LIMIT = Stat(
    "Temperature limit", "C", "temperature at which the GPU slows down (NVML) or is critical"
)
ENERGY = Stat("Energy", "J", "energy used since the driver was loaded", COUNTER)
SM_CLOCK = Stat("SM clock", "MHz", "streaming multiprocessor (graphics) clock")
MEMORY_CLOCK = Stat("Memory clock", "MHz", "memory clock")
PCIE_TX = Stat("PCIe TX throughput", "KB/s", "PCIe bytes sent by the GPU, per second")
PCIE_RX = Stat("PCIe RX throughput", "KB/s", "PCIe bytes received by the GPU, per second")
ECC_VOLATILE_CORRECTED = Stat(
    "ECC volatile corrected", "#", "corrected ECC errors since the driver was loaded", COUNTER
)
ECC_VOLATILE_UNCORRECTED = Stat(
    "ECC volatile uncorrected", "#", "uncorrected ECC errors since the driver was loaded", COUNTER
)
ECC_AGGREGATE_CORRECTED = Stat(
    "ECC aggregate corrected", "#", "corrected ECC errors over the GPU's life", COUNTER
)
ECC_AGGREGATE_UNCORRECTED = Stat(
    "ECC aggregate uncorrected", "#", "uncorrected ECC errors over the GPU's life", COUNTER
)
RETIRED_PAGES_SBE = Stat(
    "Retired pages single-bit", "#", "pages retired after repeated single-bit errors", COUNTER
)
RETIRED_PAGES_DBE = Stat(
    "Retired pages double-bit", "#", "pages retired after a double-bit error", COUNTER
)
RETIRED_PAGES_PENDING = Stat(
    "Retired pages pending", "#", "1 when a page waits to be retired at the next reset"
)
REMAPPED_ROWS_CORRECTABLE = Stat(
    "Remapped rows correctable", "#", "memory rows remapped after correctable errors", COUNTER
)
REMAPPED_ROWS_UNCORRECTABLE = Stat(
    "Remapped rows uncorrectable", "#", "memory rows remapped after uncorrectable errors", COUNTER
)
REMAPPED_ROWS_PENDING = Stat(
    "Remapped rows pending", "#", "1 when a row remapping waits for the next reset"
)
REMAPPED_ROWS_FAILED = Stat(
    "Remapped rows failed", "#", "1 when a row remapping failed (the GPU needs service)"
)
THROTTLE_REASONS = Stat(
    "Throttle reasons",
    "",
    "why the clocks are held down now, comma-separated (THROTTLE_REASONS); empty when none",
    TEXT,
)
GPU_FREQUENCY = Stat("GPU frequency", "MHz", "the graphics clock the kernel reports (DRM sysfs)")

ALL = (
    GPU_UTILIZATION,
    MEMORY_UTILIZATION,
    ENCODER_UTILIZATION,
    DECODER_UTILIZATION,
    TEMPERATURE,
    TEMPERATURE_LIMIT,
    POWER_USAGE,
    ENERGY,
    MEMORY_USED,
    MEMORY_FREE,
    MEMORY_TOTAL,
    BAR1_USED,
    BAR1_TOTAL,
    SM_CLOCK,
    MEMORY_CLOCK,
    GPU_FREQUENCY,
    PCIE_TX,
    PCIE_RX,
    ECC_L1,
    ECC_L2,
    ECC_MEMORY,
    ECC_VOLATILE_CORRECTED,
    ECC_VOLATILE_UNCORRECTED,
    ECC_AGGREGATE_CORRECTED,
    ECC_AGGREGATE_UNCORRECTED,
    RETIRED_PAGES_SBE,
    RETIRED_PAGES_DBE,
    RETIRED_PAGES_PENDING,
    REMAPPED_ROWS_CORRECTABLE,
    REMAPPED_ROWS_UNCORRECTABLE,
    REMAPPED_ROWS_PENDING,
    REMAPPED_ROWS_FAILED,
    THROTTLE_REASONS,
)
BY_NAME = {stat.name: stat for stat in ALL}

# NVML's clock event (throttle) reason bits, by the names a sample gives them.
THROTTLE_REASON_BITS = {
    "gpu_idle": 0x1,
    "applications_clocks_setting": 0x2,
    "sw_power_cap": 0x4,
    "hw_slowdown": 0x8,
    "sync_boost": 0x10,
    "sw_thermal_slowdown": 0x20,
    "hw_thermal_slowdown": 0x40,
    "hw_power_brake_slowdown": 0x80,
    "display_clock_setting": 0x100,
}

MIN_INTERVAL, MAX_INTERVAL = 1, 3600  # seconds, for stats {"interval"}

# --- status: the daemon's own counters -------------------------------------------------------

# Upper bounds (seconds) of the event-to-publish latency histogram's buckets; +Inf is implied.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
RESYNC_CAUSES = ("start", "overflow")

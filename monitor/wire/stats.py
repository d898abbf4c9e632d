"""The device statistics the ``stats`` method reports: each one's name, unit and kind, written
once for the daemon that samples them and the adapters that pass them on (Nomad, Prometheus).

Names follow Nomad's NVIDIA device plugin where it has one, so that what Nomad shows reads the
same; units are Nomad's. A statistic a device does not give is absent from its sample, never 0.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Stat:
    name: str  # as it appears in a sample: {"devices": {ID: {NAME: {"value", "unit"}}}}
    unit: str
    help: str
    counter: bool = False  # only grows (until the driver is reloaded); else a gauge


GPU_UTILIZATION = Stat("GPU utilization", "%", "time the GPU was busy, of the last period")
MEMORY_UTILIZATION = Stat("Memory utilization", "%", "memory bandwidth used, of the last period")
TEMPERATURE = Stat("Temperature", "C", "GPU temperature")
POWER_USAGE = Stat("Power usage", "W", "power drawn by the GPU and its memory")
ENERGY = Stat("Energy", "J", "energy used since the driver was loaded", counter=True)
MEMORY_USED = Stat("Memory used", "MiB", "device memory in use")
MEMORY_TOTAL = Stat("Memory total", "MiB", "device memory")

ALL = (
    GPU_UTILIZATION,
    MEMORY_UTILIZATION,
    TEMPERATURE,
    POWER_USAGE,
    ENERGY,
    MEMORY_USED,
    MEMORY_TOTAL,
)
BY_NAME = {stat.name: stat for stat in ALL}

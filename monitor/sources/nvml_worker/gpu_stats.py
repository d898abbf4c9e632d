"""One GPU's statistics, read only when the daemon asks for a sample (``tasks.NvmlSource``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from operator import itemgetter
from typing import Any

import pynvml

from monitor.sources.nvml_worker.library import FUNCTION_NOT_FOUND, MIB, error_code, is_lost
from monitor.sources.nvml_worker.pipe import Stats
from monitor.wire import stats


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
            if is_lost(exc):
                raise
            # not supported on this GPU or driver: not in the sample

    Picks = Iterable[tuple[stats.Stat, Callable[[Any], Any]]]

    def add_all(pairs: Picks, read: Callable[[], Any]) -> None:
        """Several statistics from one call: each ``pick`` of what it returned."""
        try:
            answer = read()
        except pynvml.NVMLError as exc:
            if is_lost(exc):
                raise
            return
        for stat, pick in pairs:
            found[stat.name] = stat.value(pick(answer))

    add_all(
        ((stats.GPU_UTILIZATION, lambda u: u.gpu), (stats.MEMORY_UTILIZATION, lambda u: u.memory)),
        partial(pynvml.nvmlDeviceGetUtilizationRates, handle),
    )
    add(stats.ENCODER_UTILIZATION, lambda: pynvml.nvmlDeviceGetEncoderUtilization(handle)[0])
    add(stats.DECODER_UTILIZATION, lambda: pynvml.nvmlDeviceGetDecoderUtilization(handle)[0])
    add(
        stats.TEMPERATURE,
        lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
    )
    add(
        stats.TEMPERATURE_LIMIT,
        lambda: pynvml.nvmlDeviceGetTemperatureThreshold(
            handle, pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN
        ),
    )
    add(stats.POWER_USAGE, lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000)
    add(stats.ENERGY, lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000)
    add_all(
        (
            (stats.MEMORY_USED, lambda m: m.used // MIB),
            (stats.MEMORY_FREE, lambda m: m.free // MIB),
            (stats.MEMORY_TOTAL, lambda m: m.total // MIB),
        ),
        partial(pynvml.nvmlDeviceGetMemoryInfo, handle),
    )
    add_all(
        (
            (stats.BAR1_USED, lambda b: b.bar1Used // MIB),
            (stats.BAR1_TOTAL, lambda b: b.bar1Total // MIB),
        ),
        partial(pynvml.nvmlDeviceGetBAR1MemoryInfo, handle),
    )
    add(stats.SM_CLOCK, lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM))
    add(stats.MEMORY_CLOCK, lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM))
    for stat, counter in (
        (stats.PCIE_TX, pynvml.NVML_PCIE_UTIL_TX_BYTES),
        (stats.PCIE_RX, pynvml.NVML_PCIE_UTIL_RX_BYTES),
    ):
        add(stat, partial(pynvml.nvmlDeviceGetPcieThroughput, handle, counter))
    uncorrected = pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    corrected = pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED
    volatile, aggregate = pynvml.NVML_VOLATILE_ECC, pynvml.NVML_AGGREGATE_ECC
    for stat, kind, counter in (
        (stats.ECC_VOLATILE_CORRECTED, corrected, volatile),
        (stats.ECC_VOLATILE_UNCORRECTED, uncorrected, volatile),
        (stats.ECC_AGGREGATE_CORRECTED, corrected, aggregate),
        (stats.ECC_AGGREGATE_UNCORRECTED, uncorrected, aggregate),
    ):
        add(stat, partial(pynvml.nvmlDeviceGetTotalEccErrors, handle, kind, counter))
    for stat, location in (
        (stats.ECC_L1, pynvml.NVML_MEMORY_LOCATION_L1_CACHE),
        (stats.ECC_L2, pynvml.NVML_MEMORY_LOCATION_L2_CACHE),
        (stats.ECC_MEMORY, pynvml.NVML_MEMORY_LOCATION_DEVICE_MEMORY),
    ):
        read = partial(
            pynvml.nvmlDeviceGetMemoryErrorCounter, handle, uncorrected, volatile, location
        )
        add(stat, read)
    sbe = pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS
    add(stats.RETIRED_PAGES_SBE, lambda: _retired(handle, sbe))
    dbe = pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR
    add(stats.RETIRED_PAGES_DBE, lambda: _retired(handle, dbe))
    add(
        stats.RETIRED_PAGES_PENDING,
        lambda: int(
            pynvml.nvmlDeviceGetRetiredPagesPendingStatus(handle) == pynvml.NVML_FEATURE_ENABLED
        ),
    )
    add_all(
        (
            (stats.REMAPPED_ROWS_CORRECTABLE, itemgetter(0)),
            (stats.REMAPPED_ROWS_UNCORRECTABLE, itemgetter(1)),
            (stats.REMAPPED_ROWS_PENDING, itemgetter(2)),
            (stats.REMAPPED_ROWS_FAILED, itemgetter(3)),
        ),
        partial(pynvml.nvmlDeviceGetRemappedRows, handle),
    )
    try:
        bits = pynvml.nvmlDeviceGetCurrentClocksEventReasons(handle)
    except pynvml.NVMLError as exc:
        if is_lost(exc):
            raise
        bits = None
        if error_code(exc) == FUNCTION_NOT_FOUND:  # a driver before 535
            add(
                stats.THROTTLE_REASONS,
                lambda: _reasons(pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle)),
            )
    if bits is not None:
        found[stats.THROTTLE_REASONS.name] = stats.THROTTLE_REASONS.value(_reasons(bits))
    return found

"""The stats fan-out's timing under trio's MockClock (samples on demand, shared, on the
interval's ticks), and the sysfs reader on a directory laid out as the kernel does."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from monitor.core.events import DeviceSeen, PciFacts
from monitor.core.reducer import reduce
from monitor.core.state import State
from monitor.engine.hub import Hub
from monitor.engine.stats import Histogram, StatsHub, clean
from monitor.sources.sysfs_stats import read_devices
from monitor.wire import stats

GPU = PciFacts(
    address="0000:05:00.0", vendor_id=0x1002, device_id=0x74A1, pci_class=0x038000, driver="amdgpu"
)


def hub_with_gpu() -> Hub:
    state, _ = reduce(State(), DeviceSeen(GPU))
    hub = Hub(state)
    hub.publish(state, None)
    return hub


class CountingSampler:
    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, state: State) -> dict[str, Any]:
        self.calls.append(trio.current_time())
        await trio.sleep(0.01)  # a sample takes a little while
        return {GPU.address: {"GPU utilization": {"value": len(self.calls), "unit": "%"}}}


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_nothing_is_sampled_without_subscribers(mock_clock: trio.testing.MockClock) -> None:
    sampler = CountingSampler()
    stats_hub = StatsHub(hub_with_gpu(), [sampler])
    async with trio.open_nursery() as nursery:
        await nursery.start(stats_hub.run)
        await trio.sleep(3600)
        nursery.cancel_scope.cancel()
    assert sampler.calls == []


async def test_subscribers_share_samples_on_their_ticks(mock_clock: trio.testing.MockClock) -> None:
    sampler = CountingSampler()
    stats_hub = StatsHub(hub_with_gpu(), [sampler], clock=lambda: 1000.0)
    received: dict[str, list[float]] = {"a": [], "b": [], "c": []}

    def sink(name: str) -> Any:
        async def send(_: bytes) -> None:
            received[name].append(trio.current_time())

        return send

    async with trio.open_nursery() as nursery:
        await nursery.start(stats_hub.run)
        start = trio.current_time()
        nursery.start_soon(stats_hub.stream, 1.0, sink("a"), start)
        nursery.start_soon(stats_hub.stream, 1.0, sink("b"), start + 0.3)
        nursery.start_soon(stats_hub.stream, 2.0, sink("c"), start)
        await trio.sleep(10.2)
        assert stats_hub.subscribers == 3
        nursery.cancel_scope.cancel()
    assert stats_hub.subscribers == 0
    # every second one sample, shared by all three: never one per subscriber
    assert len(sampler.calls) == 10
    for a, b in itertools.pairwise(received["a"]):
        assert b - a == pytest.approx(1.0, abs=0.02)
    # it began 0.3 s later: still half an interval from the next tick, which it shares
    assert received["b"] == pytest.approx(received["a"], abs=0.02)
    assert [round(t - start) for t in received["c"]] == [2, 4, 6, 8, 10]


async def test_a_slow_subscriber_skips_ticks(mock_clock: trio.testing.MockClock) -> None:
    sampler = CountingSampler()
    stats_hub = StatsHub(hub_with_gpu(), [sampler])
    sent: list[float] = []

    async def slow(_: bytes) -> None:
        sent.append(trio.current_time())
        await trio.sleep(2.5)  # a client that reads slowly

    async with trio.open_nursery() as nursery:
        await nursery.start(stats_hub.run)
        nursery.start_soon(stats_hub.stream, 1.0, slow, trio.current_time())
        await trio.sleep(9.8)
        nursery.cancel_scope.cancel()
    # each send takes 2.5 s: the ticks it missed are skipped, nothing queues behind it
    assert [round(t) for t in sent] == [1, 4, 7]
    assert len(sampler.calls) == 3


def test_histogram_counts_cumulatively() -> None:
    histogram = Histogram((0.001, 0.01, 0.1))
    for value in (0.0005, 0.001, 0.002, 0.5):
        histogram.observe(value)
    assert histogram.to_json() == {
        "buckets": [[0.001, 2], [0.01, 3], [0.1, 3]],
        "sum": pytest.approx(0.5035),
        "count": 4,
    }


def test_clean_keeps_only_known_statistics_of_shown_devices() -> None:
    sample: dict[str, Any] = {
        GPU.address: {
            "GPU utilization": {"value": 3, "unit": "%"},
            "Temperature": {"value": float("nan"), "unit": "C"},
            "Power usage": {"value": True, "unit": "W"},
            "Made up": {"value": 1, "unit": "#"},
            "Throttle reasons": {"value": "sw_power_cap", "unit": ""},
            "Energy": "not an entry",
        },
        "0000:99:00.0": {"GPU utilization": {"value": 1, "unit": "%"}},
    }
    assert clean(sample, [GPU.address]) == {
        GPU.address: {
            "GPU utilization": {"value": 3, "unit": "%"},
            "Throttle reasons": {"value": "sw_power_cap", "unit": ""},
        }
    }


def test_sysfs_reader_takes_what_the_kernel_wrote(tmp_path: Path) -> None:
    device = tmp_path / GPU.address
    hwmon = device / "hwmon" / "hwmon3"
    hwmon.mkdir(parents=True)
    (device / "gpu_busy_percent").write_text("12\n")
    (device / "mem_info_vram_used").write_text(str(5 << 20))
    (device / "mem_info_vram_total").write_text("garbage")  # not a number: left out
    (hwmon / "temp1_input").write_text("45500\n")
    (hwmon / "power1_input").write_text("99000000\n")  # no power1_average: this one
    (hwmon / "energy1_input").write_text("1" * 40)  # longer than a number: left out
    (device / "hwmon" / "not-hwmon").mkdir()
    found = read_devices([GPU.address, "0000:aa:00.0"], str(tmp_path))
    assert found == {
        GPU.address: {
            stats.GPU_UTILIZATION.name: {"value": 12, "unit": "%"},
            stats.MEMORY_USED.name: {"value": 5, "unit": "MiB"},
            stats.TEMPERATURE.name: {"value": 45.5, "unit": "C"},
            stats.POWER_USAGE.name: {"value": 99.0, "unit": "W"},
        }
    }

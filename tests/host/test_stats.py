"""Device telemetry (``stats``) and the daemon's counters (``status``) against a real daemon:
simulated GPUs (umockdev, with amdgpu's and i915's sysfs and hwmon files) and the real
nvidia-ml-py bindings on the stand-in libnvidia-ml.so.1, every statistic with known values."""

from __future__ import annotations

import itertools
import json
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from monitor.sim.nvml import FakeGpu, FakeNvml
from monitor.sim.umockdev import Simulator
from monitor.wire import stats
from monitor.wire.blocking import Client
from monitor.wire.errors import INVALID_PARAMS, INVALID_REQUEST, RpcError
from tests.conftest import Daemon
from tests.waiting import wait_until

pytestmark = pytest.mark.umockdev

A, B = "0000:3b:00.0", "0000:86:00.0"  # NVIDIA
AMD, INTEL = "0000:05:00.0", "0000:06:00.0"

# Every scripted number differs from the others, so that a statistic read from the wrong call
# cannot pass.
GPU_A = FakeGpu(
    bus_id=A,
    uuid="GPU-0a0a0a0a-1111-2222-3333-444444444444",
    minor=0,
    util_gpu=71,
    util_memory=23,
    util_encoder=5,
    util_decoder=6,
    memory_mib=81559,
    memory_used_mib=40960,
    bar1_mib=131072,
    bar1_used_mib=321,
    temperature_c=64,
    temperature_slowdown_c=89,
    power_mw=412345,
    energy_mj=98765432,
    sm_clock_mhz=1755,
    mem_clock_mhz=2600,
    pcie_tx_kbps=1111,
    pcie_rx_kbps=2222,
    ecc_volatile_corrected=7,
    ecc_volatile_uncorrected=2,
    ecc_aggregate_corrected=19,
    ecc_aggregate_uncorrected=3,
    ecc_l1=11,
    ecc_l2=12,
    ecc_dram=13,
    retired_sbe=4,
    retired_dbe=1,
    retired_pending=1,
    remapped_correctable=8,
    remapped_uncorrectable=9,
    remapped_pending=1,
    remapped_failed=0,
    throttle_reasons=0x4 | 0x40,  # sw_power_cap, hw_thermal_slowdown
)
# B: a GPU that supports neither retired pages nor the video engines' counters.
GPU_B = FakeGpu(
    bus_id=B,
    uuid="GPU-0b0b0b0b-5555-6666-7777-888888888888",
    minor=1,
    util_gpu=3,
    power_mw=65000,
    throttle_reasons=0,
    unsupported=(
        "nvmlDeviceGetRetiredPages",
        "nvmlDeviceGetRetiredPagesPendingStatus",
        "nvmlDeviceGetEncoderUtilization",
        "nvmlDeviceGetDecoderUtilization",
    ),
)

EXPECTED_A = {
    "GPU utilization": (71, "%"),
    "Memory utilization": (23, "%"),
    "Encoder utilization": (5, "%"),
    "Decoder utilization": (6, "%"),
    "Temperature": (64, "C"),
    "Temperature limit": (89, "C"),
    "Power usage": (412.345, "W"),
    "Energy": (98765.432, "J"),
    "Memory state": (40960, "MiB"),
    "Memory free": (81559 - 40960, "MiB"),
    "Memory total": (81559, "MiB"),
    "BAR1 buffer state": (321, "MiB"),
    "BAR1 total": (131072, "MiB"),
    "SM clock": (1755, "MHz"),
    "Memory clock": (2600, "MHz"),
    "PCIe TX throughput": (1111, "KB/s"),
    "PCIe RX throughput": (2222, "KB/s"),
    "ECC volatile corrected": (7, "#"),
    "ECC volatile uncorrected": (2, "#"),
    "ECC aggregate corrected": (19, "#"),
    "ECC aggregate uncorrected": (3, "#"),
    "ECC L1 errors": (11, "#"),
    "ECC L2 errors": (12, "#"),
    "ECC memory errors": (13, "#"),
    "Retired pages single-bit": (4, "#"),
    "Retired pages double-bit": (1, "#"),
    "Retired pages pending": (1, "#"),
    "Remapped rows correctable": (8, "#"),
    "Remapped rows uncorrectable": (9, "#"),
    "Remapped rows pending": (1, "#"),
    "Remapped rows failed": (0, "#"),
    "Throttle reasons": ("sw_power_cap,hw_thermal_slowdown", ""),
}
EXPECTED_AMD = {
    "GPU utilization": (42, "%"),
    "Memory utilization": (17, "%"),
    "Memory state": (3 * 1024, "MiB"),
    "Memory total": (192 * 1024, "MiB"),
    "Memory free": (189 * 1024, "MiB"),
    "Temperature": (51.0, "C"),
    "Temperature limit": (100.0, "C"),
    "Power usage": (253.0, "W"),
    "GPU frequency": (2100, "MHz"),
    "Memory clock": (1300, "MHz"),
}
EXPECTED_INTEL = {"Energy": (123.456789, "J"), "GPU frequency": (1650, "MHz")}

# The NVML functions only statistics call: at idle, none of them may be called.
STATS_CALLS = {
    "nvmlDeviceGetUtilizationRates",
    "nvmlDeviceGetPowerUsage",
    "nvmlDeviceGetTemperature",
    "nvmlDeviceGetTotalEnergyConsumption",
    "nvmlDeviceGetClockInfo",
    "nvmlDeviceGetPcieThroughput",
    "nvmlDeviceGetTotalEccErrors",
    "nvmlDeviceGetRemappedRows",
}


def plain(found: dict[str, Any]) -> dict[str, tuple[Any, str]]:
    return {name: (entry["value"], entry["unit"]) for name, entry in found.items()}


@pytest.fixture
def nvml(tmp_path: Path, nvml_lib: Path) -> FakeNvml:
    return FakeNvml(tmp_path / "nvml", nvml_lib, [GPU_A, GPU_B], record_calls=True)


@pytest.fixture
def hosts(sim: Simulator) -> Simulator:
    sim.add("nvidia-h100", A, 0)
    sim.add("nvidia-h100", B, 1)
    sim.add("amd-mi300x", AMD, 0)
    sim.add("intel-arc", INTEL, 1)
    return sim


@pytest.fixture
def daemon(hosts: Simulator, nvml: FakeNvml, start_daemon: Callable[..., Daemon]) -> Daemon:
    env = {**hosts.daemon_env(), **nvml.env()}
    # health watches off: they read some of the same calls (remapped rows, ECC) on their own
    # timer (tests/host/test_health_watch.py), and these tests count the statistics' reads
    started: Daemon = start_daemon(
        "--udev-source",
        "udev",
        "--nvml-timeout",
        "0.5",
        "--health-interval",
        "0",
        env=env,
        nvml=True,
    )
    return started


@pytest.fixture
def stats_client(daemon: Daemon) -> Iterator[Callable[[float], tuple[Client, dict[str, Any]]]]:
    opened: list[Client] = []

    def open_stats(interval: float) -> tuple[Client, dict[str, Any]]:
        client = daemon.client(timeout=20)
        opened.append(client)
        return client, client.call("stats", {"interval": interval})

    yield open_stats
    for client in opened:
        client.close()


def wait_for(sample: Callable[[], dict[str, Any]], ok: Callable[[dict[str, Any]], bool]) -> Any:
    """The first sample that satisfies ``ok`` (a liveness bound of 20 s)."""
    last: list[dict[str, Any]] = []

    def satisfied() -> tuple[dict[str, Any]] | None:  # in a tuple: {} may be the answer
        last[:] = [sample()]
        return (last[0],) if ok(last[0]) else None

    return wait_until(satisfied, 20, lambda: f"such a sample; the last: {last}", interval=0)[0]


def test_every_statistic_has_its_known_value(
    stats_client: Callable[[float], tuple[Client, dict[str, Any]]],
) -> None:
    client, first = stats_client(1)
    notifications = client.notifications("stats")

    def complete(params: dict[str, Any]) -> bool:  # NVML has named both GPUs
        return {A, B, AMD, INTEL} <= set(params["devices"])

    params = first if complete(first) else wait_for(lambda: next(notifications), complete)
    devices = params["devices"]
    assert plain(devices[A]) == EXPECTED_A
    unsupported = {
        "Retired pages single-bit",
        "Retired pages double-bit",
        "Retired pages pending",
        "Encoder utilization",
        "Decoder utilization",
    }
    expected_b = {name: entry for name, entry in EXPECTED_A.items() if name not in unsupported}
    b = plain(devices[B])
    assert set(b) == set(expected_b)  # what B does not support is absent, not 0
    assert b["GPU utilization"] == (3, "%") and b["Power usage"] == (65.0, "W")
    assert b["Throttle reasons"] == ("", "")
    assert plain(devices[AMD]) == EXPECTED_AMD
    assert plain(devices[INTEL]) == EXPECTED_INTEL  # nothing the kernel does not give
    assert set(b) | set(EXPECTED_AMD) <= set(stats.BY_NAME)
    assert abs(params["time"] - time.time()) < 60  # Unix seconds, not some other clock


def test_samples_follow_the_interval_and_the_kernel(
    hosts: Simulator, stats_client: Callable[[float], tuple[Client, dict[str, Any]]]
) -> None:
    client, first = stats_client(1)
    notifications = client.notifications("stats")
    times = [first["time"]] + [next(notifications)["time"] for _ in range(3)]
    gaps = [round(b - a, 1) for a, b in itertools.pairwise(times[1:])]
    assert gaps == [1.0, 1.0], times  # on the interval (the first comes within 1.5 of them)
    hosts.set_stat(AMD, "device", "gpu_busy_percent", "99")
    hosts.set_stat(AMD, "hwmon", "temp1_input", None)  # the kernel no longer gives it
    found = wait_for(
        lambda: next(notifications),
        lambda p: p["devices"][AMD]["GPU utilization"]["value"] == 99,
    )
    assert "Temperature" not in found["devices"][AMD]
    assert found["devices"][AMD]["Power usage"]["value"] == 253.0


def test_a_gpu_whose_stats_call_hangs_is_left_out_while_the_others_keep_coming(
    nvml: FakeNvml, stats_client: Callable[[float], tuple[Client, dict[str, Any]]]
) -> None:
    client, _ = stats_client(1)
    notifications = client.notifications("stats")
    wait_for(lambda: next(notifications), lambda p: {A, B} <= set(p["devices"]))
    nvml.hang("nvmlDeviceGetUtilizationRates", A)
    try:
        wait_for(lambda: next(notifications), lambda p: A not in p["devices"])
        held = [next(notifications) for _ in range(3)]
        times = [p["time"] for p in held]
        assert [round(b - a, 1) for a, b in itertools.pairwise(times)] == [1.0, 1.0]
        for params in held:
            assert A not in params["devices"]
            assert plain(params["devices"][B])["GPU utilization"] == (3, "%")
            assert AMD in params["devices"] and INTEL in params["devices"]
    finally:
        nvml.unhang()
    back = wait_for(lambda: next(notifications), lambda p: A in p["devices"])
    assert plain(back["devices"][A]) == EXPECTED_A


def test_nothing_is_read_at_idle(
    daemon: Daemon, nvml: FakeNvml, stats_client: Callable[[float], tuple[Client, dict[str, Any]]]
) -> None:
    wait_for(lambda: {"calls": nvml.calls()}, lambda c: "nvmlEventSetWait_v2" in c["calls"])
    time.sleep(2)
    assert not STATS_CALLS & set(nvml.calls())  # idle: only the event waits
    client, _ = stats_client(1)
    next(client.notifications("stats"))
    assert set(nvml.calls()) >= STATS_CALLS  # asked: read
    client.close()
    time.sleep(1.5)  # a sample under way when it closed may finish
    after_close = len([c for c in nvml.calls() if c in STATS_CALLS])
    time.sleep(2.5)
    assert len([c for c in nvml.calls() if c in STATS_CALLS]) == after_close


def test_subscribers_at_one_interval_share_each_sample(daemon: Daemon, nvml: FakeNvml) -> None:
    clients = [daemon.client(timeout=20) for _ in range(10)]
    try:
        before = nvml.calls().count("nvmlDeviceGetUtilizationRates")
        started = time.monotonic()
        for client in clients:
            client.call("stats", {"interval": 1})
        for client in clients:
            for _ in range(3):
                next(client.notifications("stats"))
        seconds = time.monotonic() - started
        reads = nvml.calls().count("nvmlDeviceGetUtilizationRates") - before
        # one read per GPU per sample, at most a sample per half second: never one per client
        assert reads <= 2 * (seconds / 0.5 + 2), (reads, seconds)
        with daemon.client() as client:
            assert client.call("status")["stats_subscribers"] == 10
    finally:
        for client in clients:
            client.close()


@pytest.mark.parametrize(
    "params", [{}, {"interval": 0}, {"interval": 3601}, {"interval": "1"}, {"interval": True},
               {"interval": 1, "devices": []}],
)  # fmt: skip
def test_a_wrong_interval_is_refused(daemon: Daemon, params: dict[str, Any]) -> None:
    with daemon.client() as client, pytest.raises(RpcError) as refused:
        client.call("stats", params)
    assert refused.value.code == INVALID_PARAMS


def test_one_stats_per_connection_beside_a_subscription(daemon: Daemon) -> None:
    with daemon.client() as client:
        client.call("subscribe")
        client.call("stats", {"interval": 1})
        with pytest.raises(RpcError) as refused:
            client.call("stats", {"interval": 2})
        assert refused.value.code == INVALID_REQUEST
        assert client.call("status")["stats_subscribers"] == 1


def test_status_counts_what_the_daemon_did(
    daemon: Daemon, hosts: Simulator, nvml: FakeNvml
) -> None:
    with daemon.client() as client:
        before = client.call("status")
        assert before["resyncs"] == {"start": 1, "overflow": 0}
        assert before["subscribers"] == 0 and before["leases"] == 0
        assert [b for b, _ in before["publish_latency_seconds"]["buckets"]] == list(
            stats.LATENCY_BUCKETS
        )
        with daemon.client() as subscriber:
            subscriber.call("subscribe")
            hosts.pci_error(AMD, "BEGIN_RECOVERY")
            hosts.pci_error(AMD, "SUCCESSFUL_RECOVERY")
            client.call("reserve", {"device_ids": [INTEL]})
            nvml.crash("nvmlEventSetWait_v2")
            wait_for(lambda: client.call("status"), lambda s: s["nvml_worker_restarts"] >= 1)
            nvml.uncrash()
            after = wait_for(lambda: client.call("status"), lambda s: s["uevents"] >= 2)
        assert after["uevents"] - before["uevents"] == 2
        assert after["subscribers"] == 1 and after["leases"] == 1
        latency = after["publish_latency_seconds"]
        # one observation per batch read from netlink: the two uevents may have come as one
        assert 1 <= latency["count"] - before["publish_latency_seconds"]["count"] <= 2
        assert latency["buckets"][-1][1] <= latency["count"] and latency["sum"] > 0
        assert all(a[1] <= b[1] for a, b in itertools.pairwise(latency["buckets"]))
        assert after["devices"] == 4 and after["started"] <= time.time()


def read_stdout_lines(process: subprocess.Popen[str], count: int) -> list[str]:
    lines: list[str] = []
    assert process.stdout is not None
    deadline = time.monotonic() + 20
    while len(lines) < count and time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 1)
        if ready:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
    return lines


def test_the_stats_command(daemon: Daemon) -> None:
    command = [sys.executable, "-m", "monitor", "stats", "--socket", str(daemon.socket)]
    raw = subprocess.Popen(
        [*command, "--json", "--interval", "1"], stdout=subprocess.PIPE, text=True
    )
    try:
        first, second = (json.loads(line) for line in read_stdout_lines(raw, 2))
    finally:
        raw.kill()
        raw.wait()
    assert second["time"] > first["time"] and AMD in second["devices"]
    table = subprocess.Popen([*command, "--interval", "1"], stdout=subprocess.PIPE, text=True)
    try:
        lines = read_stdout_lines(table, 7)
    finally:
        table.kill()
        table.wait()
    header = lines[1].split()
    assert header[:3] == ["ID", "GPU", "MEM"]
    rows = {line.split()[0]: line.split() for line in lines[2:] if line.strip()}
    assert rows[AMD][1:3] == ["42%", "17%"]
    assert rows[INTEL][1] == "-"  # the kernel gives no utilization for it
    wrong = subprocess.run([*command, "--interval", "0"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "--interval: must be from 1 to 3600" in wrong.stderr

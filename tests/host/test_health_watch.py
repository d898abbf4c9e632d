"""Health watches end to end: each condition scripted in the stand-in NVML, read by the real
nvidia-ml-py bindings in the worker, judged by the core, seen on the socket; and recovery when
NVML no longer reports it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from monitor.sim.nvml import FakeGpu, FakeNvml
from monitor.wire.mirror import Mirror
from tests.conftest import Daemon, Subscription
from tests.host import test_nvml
from tests.host.test_nvml import UUID_A, UUID_B, A, B, device, enriched, value

pytestmark = pytest.mark.umockdev
hosts, launch = test_nvml.hosts, test_nvml.launch  # its fixtures; nvml is ours, below


def gpus(**a: Any) -> list[FakeGpu]:
    """GPU A has four NVLinks (which links exist is read once per GPU); B has none."""
    a = {"nvlink_links": 4, **a}
    return [FakeGpu(bus_id=A, uuid=UUID_A, minor=0, **a), FakeGpu(bus_id=B, uuid=UUID_B, minor=1)]


@pytest.fixture
def nvml(tmp_path: Path, nvml_lib: Path) -> FakeNvml:
    return FakeNvml(tmp_path / "nvml", nvml_lib, gpus())


def conditions(mirror: Mirror, address: str) -> str:
    return str(value(mirror, address, "health_conditions") or "")


# (the gpus-file fields that make the condition, its name and verdict, healthy, what the
# description says)
CASES: list[tuple[dict[str, Any], str, bool, str]] = [
    ({"remapped_pending": 1}, "row_remap_pending=needs reset", False, "pending row remapping"),
    ({"remapped_failed": 1}, "row_remap_failed=unhealthy", False, "row remapping failed: replace"),
    ({"retired_pending": 1}, "page_retirement_pending=needs reset", False, "pending page retire"),
    ({"ecc_volatile_uncorrected": 2}, "volatile_ecc_uncorrected=needs reset", False, "ECC"),
    ({"nvlink_down": 0x4}, "nvlink_down=needs reset", False, "(link 2)"),
    ({"throttle_reasons": 0x40}, "thermal_slowdown=reported", True, ""),
    ({"throttle_reasons": 0x80}, "power_brake=reported", True, ""),
]


def test_each_condition_reaches_the_socket_and_ends_when_nvml_no_longer_reports_it(
    launch: Callable[..., Daemon],
    nvml: FakeNvml,
    subscribe: Callable[[Daemon], Subscription],
) -> None:
    daemon = launch("--health-interval", "1")
    sub = subscribe(daemon)
    sub.until(enriched)
    for fields, shown, healthy, desc in CASES:
        nvml.set_gpus(gpus(**fields))
        mirror = sub.until(lambda m, shown=shown: conditions(m, A) == shown)  # type: ignore[misc]
        found = device(mirror, A)
        assert found["healthy"] is healthy, shown
        assert desc in found["health_desc"], (shown, found["health_desc"])
        assert conditions(mirror, B) == ""  # the other GPU is not touched
        nvml.set_gpus(gpus())
        mirror = sub.until(lambda m: conditions(m, A) == "" and device(m, A)["healthy"] is True)
    # a PCIe replay storm: thousands of replays between two reads, then none
    nvml.set_gpus(gpus(pcie_replays=5000))
    sub.until(lambda m: conditions(m, A) == "pcie_replay_storm=needs reset")
    sub.until(lambda m: conditions(m, A) == "" and device(m, A)["healthy"] is True)


def test_a_leased_gpu_needing_a_reset_is_drained_and_kept(
    launch: Callable[..., Daemon],
    nvml: FakeNvml,
    subscribe: Callable[[Daemon], Subscription],
) -> None:
    daemon = launch("--health-interval", "1")
    sub = subscribe(daemon)
    sub.until(enriched)
    with daemon.client() as client:
        lease = client.call("reserve", {"device_ids": [A], "owner": "nomad"})
        nvml.set_gpus(gpus(remapped_pending=1))
        mirror = sub.until(lambda m: device(m, A).get("health") == "needs reset")
        assert device(mirror, A)["reserved_by"] == lease["reservation_id"]  # kept
        assert "pending row remapping" in daemon.log()
        assert lease["reservation_id"] in daemon.log()
        nvml.set_gpus(gpus())
        sub.until(lambda m: device(m, A)["healthy"] is True)
    assert "NVML no longer reports pending row remapping" in daemon.log()


def test_health_interval_zero_reads_nothing(
    launch: Callable[..., Daemon],
    nvml: FakeNvml,
    subscribe: Callable[[Daemon], Subscription],
) -> None:
    nvml.set_gpus(gpus(remapped_failed=1))
    daemon = launch("--health-interval", "0")
    mirror = subscribe(daemon).until(enriched)
    assert device(mirror, A)["healthy"] is True and conditions(mirror, A) == ""

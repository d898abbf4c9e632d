"""Level 1 for shared GPUs: the kubelet's own device manager sees each GPU's replicas as a
resource of their own, allocates them to two pods, and drops both replicas of a GPU that
breaks (the daemon on simulated GPUs with ``--share-replicas 2``)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from monitor.sim.nvml import FakeNvml
from monitor.sim.umockdev import Simulator
from tests.conftest import Daemon, Subscription
from tests.host.kubelet.harness import DeviceManager, PluginProcess
from tests.host.kubelet.test_devicemanager import (  # noqa: F401 (fixtures)
    NUMA,
    UUIDS,
    A,
    B,
    dirs,
    gpus,
    kubelet_leases,
    manager,
    manager_binary,
    nvml,
    start_plugin,
)

pytestmark = [pytest.mark.umockdev, pytest.mark.kubelet]

SHARED = "hotplug-monitor.io/nvidia-gpu.shared"


@pytest.fixture
def daemon(
    gpus: Simulator,  # noqa: F811
    nvml: FakeNvml,  # noqa: F811
    start_daemon: Callable[..., Daemon],
    subscribe: Callable[[Daemon], Subscription],
) -> Daemon:
    started = start_daemon(
        "--udev-source", "udev", "--share-replicas", "2",
        env={**gpus.daemon_env(), **nvml.env()}, nvml=True,
    )  # fmt: skip
    sub = subscribe(started)
    sub.until(lambda m: {f"{A}::1", f"{B}::1"} <= set(m.devices()), timeout=20)
    return started


def test_the_device_manager_allocates_replicas_of_one_gpu_to_two_pods(
    manager: DeviceManager,  # noqa: F811
    start_plugin: Callable[..., PluginProcess],  # noqa: F811
    daemon: Daemon,
    gpus: Simulator,  # noqa: F811
) -> None:
    start_plugin()
    manager.wait(SHARED, capacity=4, allocatable=4)
    devices = manager.devices(SHARED)
    assert set(devices) == {f"{g}::{k}" for g in (A, B) for k in (0, 1)}
    assert all(d["numa"] == [NUMA[i.split("::")[0]]] for i, d in devices.items())
    assert manager.request("capacity")["capacity"].get("hotplug-monitor.io/nvidia-gpu", 0) == 0
    first = manager.request("allocate", pod="one", resource=SHARED, count=1)
    second = manager.request("allocate", pod="two", resource=SHARED, count=1)
    assert "error" not in first and "error" not in second, (first, second, manager.log())
    assert first["device_ids"] != second["device_ids"]
    for pod in (first, second):
        [replica] = pod["device_ids"]
        gpu = replica.split("::")[0]
        assert pod["envs"] == {"NVIDIA_VISIBLE_DEVICES": UUIDS[gpu]}
    assert set(kubelet_leases(daemon)) == {*first["device_ids"], *second["device_ids"]}
    # A GPU that breaks takes both its replicas out of allocatable.
    gpus.pci_error(A, "BEGIN_RECOVERY")
    manager.wait(SHARED, capacity=4, allocatable=2)
    assert {i for i, d in manager.devices(SHARED).items() if d["health"] == "Unhealthy"} == {
        f"{A}::0", f"{A}::1",
    }  # fmt: skip

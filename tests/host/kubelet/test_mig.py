"""Level 1 for MIG: the kubelet's own device manager sees a simulated H100's MIG instances as
resources by ``--mig-strategy``, allocates them by MIG UUID, drops every instance of a GPU that
breaks, and follows a repartition: a profile that appears is a resource registered then (the
daemon on one H100 in MIG mode with the NVML stand-in's example layout, ``monitor.sim.mig``:
two 1g.10gb instances and one 3g.40gb)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from monitor.sim.mig import (
    EXAMPLE_UUIDS,
    h100_mig,
)
from monitor.sim.nvml import FakeNvml
from monitor.sim.umockdev import Simulator
from tests.conftest import Daemon
from tests.host.kubelet.harness import RESOURCE, DeviceManager, PluginProcess
from tests.host.kubelet.test_devicemanager import (  # noqa: F401 (fixtures)
    NUMA,
    A,
    dirs,
    kubelet_leases,
    manager,
    manager_binary,
    start_plugin,
)

pytestmark = [pytest.mark.umockdev, pytest.mark.kubelet]

ONE, TWO, THREE = EXAMPLE_UUIDS  # 1g.10gb, 1g.10gb, 3g.40gb
SMALL, LARGE = "hotplug-monitor.io/mig-1g.10gb", "hotplug-monitor.io/mig-3g.40gb"
MEDIUM = "hotplug-monitor.io/mig-2g.20gb"
FOUR = "MIG-44444444-4444-4444-8444-444444444444"


@pytest.fixture
def daemon(mig_daemon: Daemon) -> Daemon:
    """The daemon ``start_plugin`` follows: the one on the H100 in MIG mode."""
    return mig_daemon


def test_mixed_offers_a_resource_a_profile_and_allocates_instances_by_mig_uuid(
    manager: DeviceManager,  # noqa: F811
    start_plugin: Callable[..., PluginProcess],  # noqa: F811
    mig_daemon: Daemon,
    sim: Simulator,
) -> None:
    start_plugin()  # mixed: the default
    manager.wait(SMALL, capacity=2, allocatable=2)
    manager.wait(LARGE, capacity=1, allocatable=1)
    small = manager.devices(SMALL)
    assert set(small) == {ONE, TWO}
    assert all(d["numa"] == [NUMA[A]] for d in small.values())  # their GPU's node
    assert manager.request("capacity")["capacity"].get(RESOURCE, 0) == 0  # not leased whole
    # Two instances at one PCI address: GetPreferredAllocation and Allocate take MIG UUIDs.
    both = manager.request("allocate", pod="both", resource=SMALL, count=2)
    assert "error" not in both, (both, manager.log())
    assert sorted(both["device_ids"]) == [ONE, TWO]
    assert sorted(both["envs"]["NVIDIA_VISIBLE_DEVICES"].split(",")) == [ONE, TWO]
    large = manager.request("allocate", pod="large", resource=LARGE, count=1)
    assert large["device_ids"] == [THREE]
    assert large["envs"] == {"NVIDIA_VISIBLE_DEVICES": THREE}
    assert set(kubelet_leases(mig_daemon)) == {ONE, TWO, THREE}
    # The GPU breaks: every instance of it leaves allocatable, capacity stays.
    sim.pci_error(A, "BEGIN_RECOVERY")
    manager.wait(SMALL, capacity=2, allocatable=0)
    manager.wait(LARGE, capacity=1, allocatable=0)
    sim.pci_error(A, "SUCCESSFUL_RECOVERY")
    manager.wait(SMALL, capacity=2, allocatable=2)


def test_a_repartition_registers_the_profile_that_appears_and_empties_the_one_gone(
    manager: DeviceManager,  # noqa: F811
    start_plugin: Callable[..., PluginProcess],  # noqa: F811
    mig_daemon: Daemon,
    mig_nvml: FakeNvml,
) -> None:
    plugin = start_plugin()
    manager.wait(LARGE, capacity=1, allocatable=1)
    # The 3g.40gb instance becomes a 2g.20gb one and a third 1g.10gb.
    mig_nvml.set_mig(
        A,
        [
            h100_mig("1g.10gb", 1, 9, ONE),
            h100_mig("1g.10gb", 2, 10, TWO),
            h100_mig("2g.20gb", 0, 3, THREE),
            h100_mig("1g.10gb", 3, 11, FOUR),
        ],
    )
    manager.wait(MEDIUM, capacity=1, allocatable=1)
    plugin.until_logged(f"registered {MEDIUM} with the kubelet")
    manager.wait(SMALL, capacity=3, allocatable=3)
    manager.wait(LARGE, capacity=0)
    got = manager.request("allocate", pod="medium", resource=MEDIUM, count=1)
    assert got["device_ids"] == [THREE], (got, manager.log())


def test_single_refuses_two_profiles_in_one_line_and_offers_one_profile_as_the_gpu_resource(
    manager: DeviceManager,  # noqa: F811
    start_plugin: Callable[..., PluginProcess],  # noqa: F811
    mig_daemon: Daemon,
    mig_nvml: FakeNvml,
) -> None:
    plugin = start_plugin("--mig-strategy", "single")
    plugin.until_logged("--mig-strategy single needs one profile for all, not 1g.10gb, 3g.40gb")
    assert manager.request("capacity")["capacity"].get(RESOURCE, 0) == 0
    # Repartitioned into one profile: the instances are the GPU's resource.
    mig_nvml.set_mig(A, [h100_mig("1g.10gb", k, 9 + k, uuid) for k, uuid in enumerate((ONE, TWO))])
    manager.wait(RESOURCE, capacity=2, allocatable=2)
    assert set(manager.devices(RESOURCE)) == {ONE, TWO}
    got = manager.request("allocate", pod="one", resource=RESOURCE, count=1)
    assert got["envs"]["NVIDIA_VISIBLE_DEVICES"] in (ONE, TWO), (got, manager.log())


def test_none_offers_nothing_of_a_split_gpu_and_says_why_once(
    manager: DeviceManager,  # noqa: F811
    start_plugin: Callable[..., PluginProcess],  # noqa: F811
    mig_daemon: Daemon,
) -> None:
    plugin = start_plugin("--mig-strategy", "none")
    plugin.until_logged("3 MIG instances")
    plugin.until_logged("--mig-strategy none offers none")
    capacity = manager.request("capacity")["capacity"]
    assert not any(k.startswith("hotplug-monitor.io/") and v for k, v in capacity.items())
    assert plugin.log().count("--mig-strategy none offers none") == 1

"""Which devices NVML reads, by plain calls: the worker's targets, their resets, and the devices
whose statistics come from sysfs instead (``monitor.core.rules.nvidia``)."""

from __future__ import annotations

import attrs

from monitor.core.events import DeviceSeen, Event, NvmlGpuSeen
from monitor.core.rules.nvidia import (
    nvml_resets,
    nvml_targets,
    read_by_nvml,
    sysfs_stats_targets,
)
from monitor.core.state import State
from tests.pure.examples import GPU, H100, H100_B, NIC, run

A, B = "0000:3b:00.0", "0000:5e:00.0"


def test_the_first_targets_reset_no_gpu() -> None:
    assert nvml_resets(None, {A: 1, B: 0}) == []
    assert nvml_resets({}, {A: 1}) == []


def test_a_gpu_whose_recoveries_changed_is_reset() -> None:
    assert nvml_resets({A: 0, B: 0}, {A: 1, B: 0}) == [A]
    assert nvml_resets({A: 2, B: 0}, {A: 3, B: 1}) == [A, B]  # sorted


def test_a_gpu_new_to_the_worker_or_gone_from_it_is_not_reset() -> None:
    assert nvml_resets({A: 0}, {A: 0, B: 4}) == []  # B is watched afresh anyway
    assert nvml_resets({A: 0, B: 1}, {A: 0}) == []
    assert nvml_resets({A: 0}, {}) == []


def shown(*events: Event) -> State:
    state, _ = run(*events, state=State(nvml_names=True))
    return state


def test_nvml_reads_nvidia_gpus_of_the_class_filter_bound_to_nvidia() -> None:
    classes = State().match_classes
    assert read_by_nvml(H100, classes)
    assert not read_by_nvml(attrs.evolve(H100, driver="vfio-pci"), classes)
    assert not read_by_nvml(attrs.evolve(H100, driver=None), classes)
    assert not read_by_nvml(attrs.evolve(H100, vendor_id=0x1002), classes)  # not NVIDIA's
    assert not read_by_nvml(H100, ("02",))  # outside the class filter
    assert not read_by_nvml(NIC, classes)


def test_sysfs_gives_the_statistics_of_every_shown_device_nvml_does_not_read() -> None:
    amd = attrs.evolve(H100_B, vendor_id=0x1002, driver="amdgpu", model="MI300X")
    vfio = attrs.evolve(H100, address="0000:86:00.0", driver="vfio-pci")
    state = shown(
        DeviceSeen(H100), NvmlGpuSeen(GPU), DeviceSeen(amd), DeviceSeen(vfio), DeviceSeen(NIC)
    )
    assert set(state.fingerprint.devices()) == {H100.address, amd.address, vfio.address}
    assert sorted(sysfs_stats_targets(state)) == [amd.address, vfio.address]
    assert H100.address in nvml_targets(state)


def test_each_shown_device_is_read_by_nvml_or_by_sysfs_and_never_both() -> None:
    amd = attrs.evolve(H100_B, vendor_id=0x1002, driver="amdgpu", model="MI300X")
    state = shown(DeviceSeen(H100), NvmlGpuSeen(GPU), DeviceSeen(amd))
    by_sysfs, by_nvml = set(sysfs_stats_targets(state)), set(nvml_targets(state))
    assert by_sysfs | by_nvml >= set(state.fingerprint.devices())
    assert not by_sysfs & by_nvml


def test_a_gpu_waiting_for_its_name_is_watched_by_nvml_and_not_read_from_sysfs() -> None:
    state = shown(DeviceSeen(H100))
    assert sysfs_stats_targets(state) == []
    assert nvml_targets(state) == {H100.address: 0}

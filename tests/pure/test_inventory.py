"""The inventory and health rules, by plain calls: one example per kind of event at least."""

from __future__ import annotations

from typing import Any

import attrs
import pytest

from monitor.core.events import (
    ClassFilterChanged,
    DeviceGone,
    DeviceSeen,
    DrmNodeGone,
    DrmNodeSeen,
    DrmWedged,
    PciErrorReported,
    PciFacts,
    Resync,
)
from monitor.core.reducer import fold, reduce_all
from monitor.core.state import State
from tests.pure.examples import (
    CARD,
    GROUP,
    H100,
    H100_B,
    NIC,
    RENDER,
    device_json,
    run,
)


def test_device_seen_adds_a_group_with_nomad_names_and_attributes() -> None:
    state, [patch] = run(DeviceSeen(H100))
    assert state.generation == 1
    group = patch["groups"][GROUP]  # type: ignore[index]
    assert (group["vendor"], group["type"], group["name"]) == ("nvidia", "gpu", "H100 SXM5 80GB")
    device = group["devices"][H100.address]
    assert device["healthy"] is True and device["health_desc"] == ""
    assert device["hw_locality"] == {"pci_bus_id": "0000:3b:00.0"}
    assert device["attributes"]["numa_node"] == {"value": 1}
    assert device["attributes"]["vendor_id"] == {"value": "0x10de"}
    assert device["attributes"]["pci_link_width"] == {"value": 16}
    assert group["attributes"]["driver"] == {"value": "nvidia"}


def test_group_attributes_are_those_all_devices_share() -> None:
    state, [_, patch] = run(DeviceSeen(H100), DeviceSeen(H100_B))
    assert set(state.fingerprint.groups[GROUP].devices) == {H100.address, H100_B.address}
    # numa_node differs between the two, so it leaves the group attributes
    assert patch == {
        "groups": {
            GROUP: {
                "attributes": {"numa_node": None},
                "devices": {H100_B.address: device_json(state, H100_B.address)},
            }
        }
    }


def test_class_filter_keeps_other_classes_out_and_a_change_of_filter_brings_them_in() -> None:
    state, patches = run(DeviceSeen(NIC))
    assert patches == [None] and state.generation == 0
    state, [patch] = run(ClassFilterChanged(("03", "12", "02")), state=state)
    assert patch is not None and list(patch["groups"]) == ["intel/pci/8086:1592"]
    assert state.generation == 1


def test_unknown_vendor_and_class_fall_back_to_hex_names() -> None:
    odd = PciFacts(address="0000:02:00.0", vendor_id=0x1ED5, device_id=0x0100, pci_class=0x120000)
    state, _ = run(DeviceSeen(odd))
    assert list(state.fingerprint.groups) == ["1ed5/accelerator/1ed5:0100"]


def test_device_gone_removes_device_then_group_with_null() -> None:
    state, _ = run(DeviceSeen(H100), DeviceSeen(H100_B))
    state, [first, second] = run(DeviceGone(H100_B.address), DeviceGone(H100.address), state=state)
    assert first is not None and first["groups"][GROUP]["devices"] == {H100_B.address: None}
    assert second == {"groups": {GROUP: None}}
    assert state.fingerprint.groups == {}


def test_drm_nodes_update_their_parent() -> None:
    _state, [_, card_patch, render_patch, gone_patch] = run(
        DeviceSeen(H100), DrmNodeSeen(CARD), DrmNodeSeen(RENDER), DrmNodeGone("card1")
    )

    def device(patch: dict[str, Any] | None) -> dict[str, Any]:
        assert patch is not None
        found: dict[str, Any] = patch["groups"][GROUP]["devices"][H100.address]
        return found

    assert device(card_patch)["attributes"]["drm_card"] == {"value": "/dev/dri/card1"}
    assert device(render_patch)["attributes"]["drm_render"] == {"value": "/dev/dri/renderD129"}
    assert device(gone_patch)["attributes"] == {"drm_card": None}


def test_pci_error_marks_unhealthy_and_successful_recovery_restores() -> None:
    _state, [_, begin, success] = run(
        DeviceSeen(H100),
        PciErrorReported(H100.address, "BEGIN_RECOVERY", False),
        PciErrorReported(H100.address, "SUCCESSFUL_RECOVERY", True),
    )
    assert begin is not None
    begun = begin["groups"][GROUP]["devices"][H100.address]
    assert begun["healthy"] is False and "recovery in progress" in begun["health_desc"]
    healthy_again = {"healthy": True, "health_desc": "", "health": None}  # the verdict removed
    assert success == {"groups": {GROUP: {"devices": {H100.address: healthy_again}}}}


@pytest.mark.parametrize(
    ("error_event", "online", "expected"),
    [
        ("FAILED_RECOVERY", False, "recovery failed"),
        (None, False, "reported offline"),
        ("BEGIN_RECOVERY", None, "recovery in progress"),
    ],
)
def test_pci_error_kinds(error_event: str | None, online: bool | None, expected: str) -> None:
    state, _ = run(DeviceSeen(H100), PciErrorReported(H100.address, error_event, online))
    device = device_json(state, H100.address)
    assert device["healthy"] is False and expected in device["health_desc"]


def test_device_online_without_error_event_restores() -> None:
    state, _ = run(
        DeviceSeen(H100),
        PciErrorReported(H100.address, None, False),
        PciErrorReported(H100.address, None, True),
    )
    assert device_json(state, H100.address)["healthy"] is True


def test_wedged_names_the_method_and_none_restores() -> None:
    state, [*_, wedged, mended] = run(
        DeviceSeen(H100),
        DrmNodeSeen(CARD),
        DrmWedged("card1", "rebind,bus-reset"),
        DrmWedged("card1", "none"),
    )
    assert wedged is not None
    desc = wedged["groups"][GROUP]["devices"][H100.address]["health_desc"]
    assert "card1 is wedged" in desc and "rebind,bus-reset" in desc
    assert device_json(state, H100.address)["healthy"] is True
    assert mended is not None


def test_health_causes_are_independent() -> None:
    state, _ = run(
        DeviceSeen(H100),
        DrmNodeSeen(CARD),
        DrmWedged("card1", "rebind"),
        PciErrorReported(H100.address, "BEGIN_RECOVERY", False),
        PciErrorReported(H100.address, "SUCCESSFUL_RECOVERY", True),
    )
    device = device_json(state, H100.address)
    assert device["healthy"] is False and "wedged" in device["health_desc"]


def test_binding_a_driver_again_clears_a_wedge_and_unbound_is_unhealthy() -> None:
    unbound = attrs.evolve(H100, driver=None)
    state, [*_, unbind] = run(
        DeviceSeen(H100), DrmNodeSeen(CARD), DrmWedged("card1", "rebind"), DeviceSeen(unbound)
    )
    assert unbind is not None
    # unbinding is half of a rebind: the wedge is cleared by the driver being bound again
    assert unbind["groups"][GROUP]["devices"][H100.address]["health_desc"] == (
        "no kernel driver bound; DRM device card1 is wedged; recovery needs: rebind"
    )
    bound = fold(state, [DeviceSeen(H100)])
    assert device_json(bound.state, H100.address)["healthy"] is True
    assert bound.patch is not None
    assert bound.recoveries == {H100.address: "its driver was rebound"}


def test_removal_forgets_health_so_a_replugged_device_starts_healthy() -> None:
    state, _ = run(
        DeviceSeen(H100),
        PciErrorReported(H100.address, "FAILED_RECOVERY", False),
        DeviceGone(H100.address),
        DeviceSeen(H100),
    )
    assert device_json(state, H100.address)["healthy"] is True


def test_events_for_unknown_devices_change_nothing() -> None:
    state, patches = run(
        PciErrorReported("0000:99:00.0", "BEGIN_RECOVERY", False),
        DrmWedged("card9", "rebind"),
        DeviceGone("0000:99:00.0"),
        DrmNodeGone("card9"),
    )
    assert patches == [None] * 4 and state.generation == 0


def test_no_op_events_produce_no_patch_and_no_generation() -> None:
    state, _ = run(DeviceSeen(H100), DrmNodeSeen(CARD))
    again, patches = run(DeviceSeen(H100), DrmNodeSeen(CARD), Resync([H100], [CARD]), state=state)
    assert patches == [None, None, None]
    assert again.generation == state.generation


def test_a_batch_is_one_patch_and_one_generation() -> None:
    state, patch = reduce_all(State(), [DeviceSeen(H100), DrmNodeSeen(CARD), DeviceSeen(H100_B)])
    assert state.generation == 1 and patch is not None
    assert set(patch["groups"][GROUP]["devices"]) == {H100.address, H100_B.address}


def test_resync_replaces_the_inventory_and_keeps_health_of_devices_that_stayed() -> None:
    state, _ = run(
        DeviceSeen(H100),
        DeviceSeen(H100_B),
        PciErrorReported(H100.address, "BEGIN_RECOVERY", False),
        PciErrorReported(H100_B.address, "BEGIN_RECOVERY", False),
    )
    state, [patch] = run(Resync([H100], [CARD]), state=state)
    assert patch is not None
    assert patch["groups"][GROUP]["devices"][H100_B.address] is None
    assert device_json(state, H100.address)["healthy"] is False  # sysfs cannot vouch for it


def test_a_kernel_recovery_of_a_pci_error_counts_as_a_reset() -> None:
    state, _ = run(DeviceSeen(H100), PciErrorReported(H100.address, "BEGIN_RECOVERY", False))
    assert state.resets == {}
    state, _ = run(PciErrorReported(H100.address, "SUCCESSFUL_RECOVERY", True), state=state)
    assert state.resets == {H100.address: 1}  # NVML reads it afresh
    state, _ = run(PciErrorReported(H100.address, "SUCCESSFUL_RECOVERY", True), state=state)
    assert state.resets == {H100.address: 1}  # no error was there to recover from


def test_a_device_keeps_its_name_while_it_keeps_its_driver() -> None:
    state, _ = run(DeviceSeen(H100))
    renamed = attrs.evolve(H100, model="H100 PCIe", link_width=8)  # a change uevent
    state, [patch] = run(DeviceSeen(renamed), state=state)
    assert list(state.fingerprint.groups) == [GROUP]
    assert patch is not None
    assert patch["groups"][GROUP]["devices"][H100.address]["attributes"] == {
        "pci_link_width": {"value": 8}
    }
    vfio = attrs.evolve(renamed, driver="vfio-pci")
    state, _ = run(DeviceSeen(vfio), state=state)  # another binding: named afresh
    assert list(state.fingerprint.groups) == ["nvidia/gpu/H100 PCIe"]


def test_an_nvidia_gpu_bound_to_nvidia_waits_for_nvmls_name() -> None:
    state, [patch] = run(DeviceSeen(H100), state=State(nvml_names=True))
    assert patch is None and state.fingerprint.groups == {}  # not shown yet
    assert state.naming == {H100.address: 1}
    other, _ = run(DeviceSeen(NIC), ClassFilterChanged(("02",)), state=State(nvml_names=True))
    assert other.naming == {} and list(other.fingerprint.groups) == ["intel/pci/8086:1592"]


def test_another_device_at_an_address_keeps_nothing_of_the_first() -> None:
    state, _ = run(DeviceSeen(H100), PciErrorReported(H100.address, "FAILED_RECOVERY", False))
    swapped = attrs.evolve(H100, vendor_id=0x1002, device_id=0x74A1, model="Instinct MI300X")
    state, _ = run(DeviceSeen(swapped), state=state)  # its removal was lost in a storm
    assert list(state.fingerprint.groups) == ["amd/gpu/Instinct MI300X"]
    assert device_json(state, H100.address)["healthy"] is True and state.problems == {}

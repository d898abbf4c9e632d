"""The reducer with plain function calls: one example per event kind, then properties."""

from __future__ import annotations

import copy
from typing import Any

import attrs
import json_merge_patch
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.core.events import (
    ClassFilterChanged,
    ConnectionClosed,
    DeviceGone,
    DeviceSeen,
    DrmNode,
    DrmNodeGone,
    DrmNodeSeen,
    DrmWedged,
    Event,
    LeaseEnded,
    NvmlEventReported,
    NvmlGpu,
    NvmlGpuSeen,
    NvmlReachable,
    NvmlUnreachable,
    PciErrorReported,
    PciFacts,
    ReleaseRequested,
    ReserveRequested,
    Resync,
    XidPolicyChanged,
    XidReported,
)
from monitor.core.fingerprint import build_fingerprint
from monitor.core.leases import Lease
from monitor.core.model import Attribute
from monitor.core.reducer import State, reduce, reduce_all
from monitor.core.xids import XidPolicy

H100 = PciFacts(
    address="0000:3b:00.0",
    vendor_id=0x10DE,
    device_id=0x2330,
    pci_class=0x030200,
    subsystem_vendor_id=0x10DE,
    subsystem_device_id=0x16C1,
    driver="nvidia",
    model="H100 SXM5 80GB",
    numa_node=1,
    link_speed="32.0 GT/s PCIe",
    link_width=16,
)
H100_B = attrs.evolve(H100, address="0000:5e:00.0", numa_node=0)
CARD = DrmNode(name="card1", parent=H100.address, devnode="/dev/dri/card1")
RENDER = DrmNode(name="renderD129", parent=H100.address, devnode="/dev/dri/renderD129")
NIC = PciFacts(address="0000:01:00.0", vendor_id=0x8086, device_id=0x1592, pci_class=0x020000)
GROUP = "nvidia/gpu/H100 SXM5 80GB"


def run(*events: Event, state: State | None = None) -> tuple[State, list[dict[str, Any] | None]]:
    state = state or State()
    patches = []
    for event in events:
        state, patch = reduce(state, event)
        patches.append(patch)
    return state, patches


def device_json(state: State, address: str) -> dict[str, Any]:
    for group in state.fingerprint.to_json()["groups"].values():
        if address in group["devices"]:
            device: dict[str, Any] = group["devices"][address]
            return device
    raise KeyError(address)


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
    assert success == {
        "groups": {GROUP: {"devices": {H100.address: {"healthy": True, "health_desc": ""}}}}
    }


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
    state, [*_, unbind, bind] = run(
        DeviceSeen(H100),
        DrmNodeSeen(CARD),
        DrmWedged("card1", "rebind"),
        DeviceSeen(unbound),
        DeviceSeen(H100),
    )
    assert unbind is not None
    # unbinding is half of a rebind: the wedge is cleared by the driver being bound again
    assert unbind["groups"][GROUP]["devices"][H100.address]["health_desc"] == (
        "no kernel driver bound; DRM device card1 is wedged; recovery needs: rebind"
    )
    assert device_json(state, H100.address)["healthy"] is True
    assert bind is not None
    assert state.recoveries == {H100.address: "its driver was rebound"}


def test_the_nvidia_minor_comes_from_the_driver_else_from_nvml() -> None:
    gpu = NvmlGpu(address=H100.address, uuid="GPU-a", name="NVIDIA H100 80GB HBM3", minor=5)
    state, _ = run(DeviceSeen(H100), NvmlGpuSeen(gpu))
    assert state.nvidia_minor(H100.address) == 5  # no proc file read: NVML's
    state, _ = reduce(state, DeviceSeen(attrs.evolve(H100, nvidia_minor=2)))
    assert state.nvidia_minor(H100.address) == 2  # the driver's own file wins
    assert state.nvidia_minor("0000:ee:00.0") is None


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


# --- properties -------------------------------------------------------------------------------

ADDRESSES = ["0000:3b:00.0", "0000:5e:00.0", "0000:af:00.0", "0000:01:00.0"]
DRM_NAMES = ["card0", "card1", "renderD128", "renderD129", "card0-DP-1"]
LEASE_IDS = ["lease-1", "lease-2", "lease-3"]

facts_st = st.builds(
    PciFacts,
    address=st.sampled_from(ADDRESSES),
    vendor_id=st.sampled_from([0x10DE, 0x1002, 0x8086, 0x1ED5]),
    device_id=st.sampled_from([0x2330, 0x74A1]),
    pci_class=st.sampled_from([0x030200, 0x038000, 0x120000, 0x020000]),
    driver=st.sampled_from([None, "nvidia", "amdgpu", "vfio-pci"]),
    model=st.sampled_from([None, "H100 SXM5 80GB", "Instinct MI300X"]),
    numa_node=st.sampled_from([None, -1, 0, 1]),
    link_speed=st.sampled_from([None, "32.0 GT/s PCIe", "16.0 GT/s PCIe"]),
    link_width=st.sampled_from([None, 8, 16]),
)
node_st = st.builds(
    DrmNode,
    name=st.sampled_from(DRM_NAMES),
    parent=st.sampled_from(ADDRESSES),
    devnode=st.sampled_from(["/dev/dri/card0", "/dev/dri/card1", "/dev/dri/renderD128"]),
)
truth_st = st.builds(
    lambda facts, nodes: Resync(
        list({f.address: f for f in facts}.values()), list({n.name: n for n in nodes}.values())
    ),
    st.lists(facts_st, max_size=4),
    st.lists(node_st, max_size=4),
)
event_st: st.SearchStrategy[Event] = st.one_of(
    st.builds(DeviceSeen, facts_st),
    st.builds(DeviceGone, st.sampled_from(ADDRESSES)),
    st.builds(DrmNodeSeen, node_st),
    st.builds(DrmNodeGone, st.sampled_from(DRM_NAMES)),
    st.builds(
        PciErrorReported,
        st.sampled_from(ADDRESSES),
        st.sampled_from([None, "BEGIN_RECOVERY", "SUCCESSFUL_RECOVERY", "FAILED_RECOVERY", "X"]),
        st.sampled_from([None, True, False]),
    ),
    st.builds(
        DrmWedged, st.sampled_from(DRM_NAMES), st.sampled_from(["none", "rebind", "unknown"])
    ),
    truth_st,
    st.builds(ClassFilterChanged, st.sampled_from([("03", "12"), ("03",), ("02", "0302"), ()])),
    st.builds(
        ReserveRequested,
        st.lists(st.sampled_from([*ADDRESSES, "GPU-a", "0000:ee:00.0"]), min_size=1, max_size=3),
        st.builds(
            Lease,
            id=st.sampled_from(LEASE_IDS),
            devices=st.just({}),
            uid=st.sampled_from([0, 1000]),
            gid=st.just(0),
            pid=st.just(1),
            created=st.just(0.0),
            connection=st.sampled_from([None, 7]),
        ),
    ),
    st.builds(
        ReleaseRequested,
        st.integers(0, 3),
        st.sampled_from([0, 1000, 1001]),
        st.sampled_from([None, *LEASE_IDS]),
        st.lists(st.sampled_from(ADDRESSES), max_size=2),
    ),
    st.builds(LeaseEnded, st.sampled_from(LEASE_IDS)),
    st.builds(ConnectionClosed, st.just(7)),
    st.builds(
        NvmlGpuSeen,
        st.builds(
            NvmlGpu,
            address=st.sampled_from(ADDRESSES),
            uuid=st.sampled_from(["GPU-a", "GPU-b"]),
            name=st.sampled_from(["NVIDIA H100 80GB HBM3", "NVIDIA A100"]),
            attributes=st.sampled_from([{}, {"memory": Attribute(81559, "MiB")}]),
        ),
    ),
    st.builds(XidReported, st.sampled_from(ADDRESSES), st.sampled_from([13, 48, 79, 999])),
    st.builds(
        NvmlEventReported,
        st.sampled_from(ADDRESSES),
        st.sampled_from(["double_bit_ecc", "gpu_unavailable", "recovery_action"]),
        st.sampled_from([None, 0, 1, 2]),
    ),
    st.builds(NvmlUnreachable, st.sampled_from(ADDRESSES), st.just("NVML not responding")),
    st.builds(NvmlReachable, st.sampled_from(ADDRESSES)),
    st.builds(
        XidPolicyChanged,
        st.sampled_from([XidPolicy(), XidPolicy(ignore=frozenset({48, 79})), XidPolicy(False)]),
    ),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(event_st, max_size=40))
def test_patches_applied_in_order_rebuild_the_final_snapshot(events: list[Event]) -> None:
    state = State()
    mirror = state.fingerprint.to_json()
    for event in events:
        before = state.fingerprint.to_json()
        state_generation = state.generation
        state, patch = reduce(state, event)
        after = state.fingerprint.to_json()
        if patch is None:
            assert after == before and state.generation == state_generation
        else:
            assert after != before and state.generation == state_generation + 1
            mirror = json_merge_patch.merge(copy.deepcopy(mirror), patch)
        assert mirror == after
        # built from the changed devices and the rest of the last one: as if built from scratch
        assert state.fingerprint == build_fingerprint(state)
        held = [d for lease in state.leases.values() for d in lease.devices]
        assert len(held) == len(set(held))  # no device in two leases


@settings(max_examples=300, deadline=None)
@given(st.lists(event_st, max_size=30), truth_st)
def test_resync_from_any_state_yields_the_truth(events: list[Event], truth: Resync) -> None:
    state, _ = reduce_all(State(), events)
    synced, _ = reduce(state, truth)
    fresh, _ = reduce(State(match_classes=state.match_classes), truth)
    assert dict(synced.devices) == {f.address: f for f in truth.devices}
    assert dict(synced.drm_nodes) == {n.name: n for n in truth.drm_nodes}

    def without_health(s: State) -> dict[str, Any]:
        snapshot = s.fingerprint.to_json()
        for group in snapshot["groups"].values():
            for device in group["devices"].values():
                del device["healthy"], device["health_desc"]
        return snapshot

    assert without_health(synced) == without_health(fresh)
    for address, facts in synced.devices.items():
        # Health evidence only events can give is kept for devices that stayed; nothing else.
        if address not in state.devices or not state.problems.get(address):
            assert synced.problems.get(address) is None, facts
    assert reduce(synced, truth)[1] is None  # a second identical resync changes nothing

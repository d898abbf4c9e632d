"""MIG by plain calls: a GPU in MIG mode shown as its MIG devices, leased one by one, blocked by
a whole lease, repartitioned, and its XIDs counted per instance where they are the instance's."""

from __future__ import annotations

from typing import Any

import attrs
import pytest

from monitor.core.answers import Grant, Reason, Refusal
from monitor.core.events import (
    DeviceGone,
    DeviceSeen,
    MigLayoutSeen,
    MigMinorsRead,
    NvmlGpuSeen,
    XidReported,
)
from monitor.core.fingerprint import build_fingerprint
from monitor.core.mig import MigInstance, MigLayout, parse_mig_minors, profile_name
from monitor.core.plan import plan
from monitor.core.rules.nvidia import sysfs_stats_targets
from monitor.core.state import State
from monitor.core.transitions import LeaseWarning, journal_entries
from monitor.sim.mig import ci_access_minor, gi_access_minor, mig_minors_text
from tests.pure.examples import GPU, GPU_UUID, H100, OTHER_MEMBER, decide, release, run
from tests.pure.examples import reserve as reserve_request

A = H100.address
ONE_A = MigInstance("MIG-11111111-1111-4111-8111-111111111111", 9, 0, 1, 1, 9984)
ONE_B = MigInstance("MIG-22222222-2222-4222-8222-222222222222", 10, 0, 1, 1, 9984)
THREE = MigInstance("MIG-33333333-3333-4333-8333-333333333333", 2, 0, 3, 3, 40448)
LAYOUT = MigLayout(True, (THREE, ONE_A, ONE_B))
NAME = H100.model  # the GPU's name as its group shows it (NVML names it where it is waited for)
SMALL = f"nvidia/mig/{NAME} MIG 1g.10gb"
LARGE = f"nvidia/mig/{NAME} MIG 3g.40gb"
WHOLE = f"nvidia/gpu/{NAME}"
MINORS = parse_mig_minors(mig_minors_text())


def mig_host(layout: MigLayout = LAYOUT) -> State:
    state, _ = run(
        DeviceSeen(H100), NvmlGpuSeen(GPU), MigMinorsRead(MINORS), MigLayoutSeen(A, layout)
    )
    return state


def shown(state: State) -> dict[str, tuple[str, Any]]:
    return {i: (g.key, d) for i, (g, d) in state.fingerprint.devices().items()}


def answer(state: State, request: Any) -> tuple[State, Any]:
    reduction = decide(state, request)
    return reduction.state, reduction.answers[request.token]


def test_profiles_are_named_as_nvidia_names_them() -> None:
    # H100 80GB: the memory nvidia-smi mig -lgip lists (9.75, 19.62, 39.50, 79.25 GiB)
    assert profile_name(1, 1, 9984) == "1g.10gb"
    assert profile_name(2, 2, 20096) == "2g.20gb"
    assert profile_name(3, 3, 40448) == "3g.40gb"
    assert profile_name(7, 7, 81152) == "7g.80gb"
    # A100 40GB: 4.75 GiB is 1g.5gb; a compute instance of 1 of 2 slices
    assert profile_name(1, 1, 4864) == "1g.5gb"
    assert profile_name(2, 1, 20096) == "1c.2g.20gb"


def test_a_gpu_with_mig_devices_is_shown_as_them_alone() -> None:
    state = mig_host()
    devices = shown(state)
    assert set(devices) == {ONE_A.uuid, ONE_B.uuid, THREE.uuid}  # not the GPU itself
    assert devices[ONE_A.uuid][0] == SMALL and devices[THREE.uuid][0] == LARGE
    device = devices[ONE_A.uuid][1]
    values = {k: a.value for k, a in device.attributes.items()}
    assert values["mig_profile"] == "1g.10gb"
    assert device.attributes["memory"].unit == "MiB" and values["memory"] == 9984
    assert values["gpu_slices"] == 1 and values["compute_slices"] == 1
    assert values["gpu_instance_id"] == 9 and values["compute_instance_id"] == 0
    assert values["parent_uuid"] == GPU_UUID and values["parent_pci_bus_id"] == A
    assert values["numa_node"] == H100.numa_node
    minor = GPU.minor
    assert minor is not None
    assert values["mig_caps"] == (
        f"/dev/nvidia-caps/nvidia-cap{gi_access_minor(minor, 9)},"
        f"/dev/nvidia-caps/nvidia-cap{ci_access_minor(minor, 9, 0)}"
    )
    assert device.hw_locality.pci_bus_id == A and device.healthy
    # the fingerprint built afresh is the one built change by change
    assert build_fingerprint(state) == state.fingerprint


def test_mig_mode_without_instances_shows_the_gpu_whole_but_does_not_lease_it() -> None:
    state = mig_host(MigLayout(True, ()))
    assert shown(state)[A][0] == WHOLE
    assert shown(state)[A][1].attributes["mig_mode"].value == "enabled"
    _, refused = answer(state, reserve_request(A))
    assert isinstance(refused, Refusal) and refused.reason is Reason.INVALID
    assert "MIG mode with no MIG instance" in refused.message


def test_old_form_uuids_are_left_out() -> None:
    old = attrs.evolve(ONE_A, uuid=f"MIG-{GPU_UUID}/9/0")
    state = mig_host(MigLayout(True, (old, THREE)))
    assert set(shown(state)) == {THREE.uuid}


def test_instances_are_leased_one_by_one_and_two_go_to_two_holders() -> None:
    state = mig_host()
    state, first = answer(state, reserve_request(ONE_A.uuid))
    assert isinstance(first, Grant)
    state, second = answer(state, reserve_request(ONE_B.uuid, peer=OTHER_MEMBER, lease_id="l2"))
    assert isinstance(second, Grant)
    assert shown(state)[ONE_A.uuid][1].reserved_by == "lease-1"
    assert shown(state)[ONE_B.uuid][1].reserved_by == "l2"
    _, again = answer(state, reserve_request(ONE_A.uuid, peer=OTHER_MEMBER, lease_id="l3"))
    assert isinstance(again, Refusal) and again.reason is Reason.RESERVED


@pytest.mark.parametrize("name", [A, GPU_UUID])
def test_the_gpu_is_not_leased_whole_while_it_has_instances(name: str) -> None:
    _, refused = answer(mig_host(), reserve_request(name))
    assert isinstance(refused, Refusal) and refused.reason is Reason.UNKNOWN_DEVICE
    assert "reserve one of its MIG instances: " in refused.message
    assert ONE_A.uuid in refused.message and THREE.uuid in refused.message
    assert refused.data is not None
    assert set(refused.data["mig_instances"][name]) == {ONE_A.uuid, ONE_B.uuid, THREE.uuid}


def test_a_whole_lease_blocks_the_instances_until_it_ends() -> None:
    state = mig_host(MigLayout(False, ()))
    state, granted = answer(state, reserve_request(A))
    assert isinstance(granted, Grant)
    state, _ = run(MigLayoutSeen(A, LAYOUT), state=state)  # partitioned under the lease
    assert set(shown(state)) == {A}
    _, blocked = answer(state, reserve_request(ONE_A.uuid, peer=OTHER_MEMBER, lease_id="l2"))
    assert isinstance(blocked, Refusal) and blocked.reason is Reason.UNKNOWN_DEVICE
    assert "which is reserved whole (lease-1)" in blocked.message
    state, _ = answer(state, release(lease_id="lease-1"))
    assert set(shown(state)) == {ONE_A.uuid, ONE_B.uuid, THREE.uuid}
    assert build_fingerprint(state) == state.fingerprint


def test_container_edits_of_an_instance() -> None:
    state = mig_host()
    _, grant = answer(state, reserve_request(ONE_A.uuid))
    assert isinstance(grant, Grant)
    edits = plan(grant.devices, minor_of=grant.nvidia_minors.get, exists=lambda _: True)
    assert edits.envs == {"NVIDIA_VISIBLE_DEVICES": ONE_A.uuid}
    paths = [d.host_path for d in edits.devices]
    minor = GPU.minor
    assert minor is not None
    assert f"/dev/nvidia{minor}" in paths and "/dev/nvidiactl" in paths
    assert "/dev/nvidia-uvm" in paths and "/dev/nvidia-uvm-tools" in paths
    assert f"/dev/nvidia-caps/nvidia-cap{gi_access_minor(minor, 9)}" in paths
    assert f"/dev/nvidia-caps/nvidia-cap{ci_access_minor(minor, 9, 0)}" in paths
    assert not [p for p in paths if p.startswith("/dev/dri")]  # the GPU's DRM nodes: not its


def test_an_instance_without_capability_minors_is_not_leased() -> None:
    state, _ = run(
        DeviceSeen(H100),
        NvmlGpuSeen(GPU),
        MigMinorsRead(attrs.evolve(MINORS, gi_access={}, ci_access={}, problem="not found")),
        MigLayoutSeen(A, LAYOUT),
    )
    _, refused = answer(state, reserve_request(ONE_A.uuid))
    assert isinstance(refused, Refusal) and "mig-minors file: not found" in refused.message


def test_a_destroyed_instance_leaves_and_its_lease_ends_naming_the_holder() -> None:
    state = mig_host()
    state, _ = answer(state, reserve_request(ONE_A.uuid))
    seven = MigInstance("MIG-77777777-7777-4777-8777-777777777777", 0, 0, 7, 7, 81152)
    reduction = decide(state, MigLayoutSeen(A, MigLayout(True, (seven,))))
    new = reduction.state
    assert set(shown(new)) == {seven.uuid}
    assert shown(new)[seven.uuid][0] == f"nvidia/mig/{NAME} MIG 7g.80gb"
    assert not new.leases
    (change,) = reduction.lease_changes
    assert change.kind == "ended" and change.devices == (ONE_A.uuid,)
    assert "revoked" in change.reason and "uid 1000" in change.reason
    assert build_fingerprint(new) == new.fingerprint


def test_mig_mode_turned_off_shows_the_gpu_whole_again() -> None:
    state, _ = run(MigLayoutSeen(A, MigLayout(False, ())), state=mig_host())
    assert set(shown(state)) == {A}
    assert shown(state)[A][1].attributes["mig_mode"].value == "disabled"


def test_a_gpu_that_leaves_takes_its_instances_along() -> None:
    state, _ = run(DeviceGone(A), state=mig_host())
    assert not shown(state)


def test_an_application_xid_in_an_instance_is_that_instances_alone() -> None:
    state, _ = run(XidReported(A, 13, gpu_instance=9, compute_instance=0), state=mig_host())
    devices = shown(state)
    assert devices[ONE_A.uuid][1].attributes["last_xid"].value == 13
    assert "last_xid" not in devices[ONE_B.uuid][1].attributes
    assert all(d.healthy for _, d in devices.values())


def test_a_reset_xid_naming_an_instance_is_the_whole_gpus() -> None:
    state, _ = run(XidReported(A, 48, gpu_instance=9, compute_instance=0), state=mig_host())
    devices = shown(state)
    assert not any(d.healthy for _, d in devices.values())  # every instance: a reset ends all
    assert all(d.health == "needs reset" for _, d in devices.values())
    assert "last_xid" not in devices[ONE_A.uuid][1].attributes


def test_an_xid_naming_no_instance_is_the_whole_gpus() -> None:
    state, _ = run(XidReported(A, 13), state=mig_host())
    assert all("last_xid" not in d.attributes for _, d in shown(state).values())
    assert state.xids[A] == (13, 1)


def test_a_gpu_wide_problem_is_a_lease_warning_for_each_instance_holder() -> None:
    state = mig_host()
    state, _ = answer(state, reserve_request(ONE_A.uuid))
    reduction = decide(state, XidReported(A, 79))
    warnings = [e for e in journal_entries(state, reduction) if isinstance(e, LeaseWarning)]
    assert [w.device_id for w in warnings] == [ONE_A.uuid]


def test_mig_devices_have_no_sysfs_statistics() -> None:
    assert sysfs_stats_targets(mig_host()) == []


def test_mig_minors_parsing_skips_what_is_not_an_access_entry() -> None:
    text = "config 1\nmonitor 2\ngpu0/gi1/access 12\ngpu0/gi1/ci0/access 13\nbad line\n\x00\n"
    minors = parse_mig_minors(text + "gpu0/gi1/ci0/access notanumber\ngpu0/gi2/access 9 9\n")
    assert dict(minors.gi_access) == {(0, 1): 12}
    assert dict(minors.ci_access) == {(0, 1, 0): 13}

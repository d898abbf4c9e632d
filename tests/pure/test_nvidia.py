"""The NVIDIA rules, by plain calls: names, NVML facts, XIDs, recovery, the XID policy."""

from __future__ import annotations

import attrs
import pytest

from monitor.core.events import (
    DeviceGone,
    DeviceSeen,
    NvmlAbsent,
    NvmlEventReported,
    NvmlGpuSeen,
    NvmlNameWaitOver,
    NvmlReachable,
    NvmlUnreachable,
    PciErrorReported,
    XidPolicyChanged,
    XidReported,
)
from monitor.core.rules.nvidia import nvml_targets
from monitor.core.state import State
from monitor.core.xids import XidPolicy
from tests.pure.examples import (
    GPU,
    GPU_UUID,
    GROUP,
    H100,
    H100_B,
    NIC,
    NVML_GROUP,
    decide,
    device_json,
    group_of,
    run,
)

WAITING = State(nvml_names=True)


def named(state: State | None = None) -> State:
    """The H100 seen, and named by NVML."""
    state, _ = run(DeviceSeen(H100), NvmlGpuSeen(GPU), state=state or WAITING)
    return state


def test_nvml_names_a_waiting_gpu_and_it_appears_once_in_its_group() -> None:
    state, [seen, nvml] = run(DeviceSeen(H100), NvmlGpuSeen(GPU), state=WAITING)
    assert seen is None  # hidden while it waits
    assert nvml is not None and list(nvml["groups"]) == [NVML_GROUP]
    device = device_json(state, H100.address)
    assert device["attributes"]["uuid"] == {"value": GPU.uuid}
    assert state.naming == {} and state.names == {H100.address: "NVIDIA H100 80GB HBM3"}


def test_a_wait_that_is_over_shows_the_gpu_under_the_database_name_for_good() -> None:
    state, _ = run(DeviceSeen(H100), state=WAITING)
    _, [patch] = run(NvmlNameWaitOver(H100.address, wait=99), state=state)
    assert patch is None  # another wait's end
    state, [patch] = run(NvmlNameWaitOver(H100.address, wait=1), state=state)
    assert patch is not None and list(patch["groups"]) == [GROUP]
    state, [late] = run(NvmlGpuSeen(GPU), state=state)
    assert group_of(state, H100.address) == GROUP  # one name, whoever answers later
    assert late is not None and "uuid" in str(late)  # but NVML's facts are shown


def test_nvml_absent_ends_every_wait() -> None:
    state, _ = run(DeviceSeen(H100), DeviceSeen(H100_B), state=WAITING)
    state, [patch] = run(NvmlAbsent(), state=state)
    assert patch is not None and set(state.fingerprint.groups[GROUP].devices) == {
        H100.address,
        H100_B.address,
    }
    assert state.nvml_names is False
    state, _ = run(DeviceGone(H100.address), DeviceSeen(H100), state=state)
    assert group_of(state, H100.address) == GROUP  # no wait any more


def test_nvml_unreachable_names_a_waiting_gpu_and_marks_it_unhealthy() -> None:
    state, _ = run(DeviceSeen(H100), state=WAITING)
    state, _ = run(NvmlUnreachable(H100.address, "NVML not responding (x)"), state=state)
    device = device_json(state, H100.address)
    assert group_of(state, H100.address) == GROUP
    assert device["healthy"] is False and device["health_desc"] == "NVML not responding (x)"
    state, _ = run(NvmlReachable(H100.address), state=state)
    assert device_json(state, H100.address)["healthy"] is True


def test_a_lost_gpu_needs_a_reboot() -> None:
    state, _ = run(NvmlUnreachable(H100.address, "GPU is lost", lost=True), state=named())
    assert state.problems[H100.address]["nvml"].recovery_action == "reboot the node"


def test_nvml_facts_belong_to_a_gpu_bound_to_nvidia() -> None:
    state = named()
    assert group_of(state, H100.address) == NVML_GROUP
    state, _ = run(XidReported(H100.address, 13), state=state)
    for driver in ("vfio-pci", None):
        rebound, _ = run(DeviceSeen(attrs.evolve(H100, driver=driver)), state=state)
        assert rebound.nvml == {} and rebound.xids == {}
        # another driver: the database's name; unbound (a driver reload): the name it had
        assert group_of(rebound, H100.address) == (GROUP if driver else NVML_GROUP)
        assert "uuid" not in device_json(rebound, H100.address)["attributes"]
        # and NVML, which no longer watches it, cannot make it its own again
        again, _ = run(NvmlGpuSeen(GPU), XidReported(H100.address, 48), state=rebound)
        assert again.nvml == {} and again.xids == {} and again.problems == {}


def test_a_gpu_rebound_to_nvidia_waits_for_its_name_again() -> None:
    # from another driver (the database's name meanwhile): hidden until NVML names it again
    state = named()
    other, _ = run(DeviceSeen(attrs.evolve(H100, driver="vfio-pci")), state=state)
    unbound, _ = run(DeviceSeen(attrs.evolve(H100, driver=None)), state=other)
    bound, [patch] = run(DeviceSeen(H100), state=unbound)
    assert group_of(bound, H100.address) is None and bound.naming == {H100.address: 2}
    assert patch == {"groups": {GROUP: None}}
    again, _ = run(NvmlGpuSeen(GPU), state=bound)
    assert group_of(again, H100.address) == NVML_GROUP
    # unbound from nvidia and bound again (a driver reload): shown under NVML's name throughout
    unbound, _ = run(DeviceSeen(attrs.evolve(H100, driver=None)), state=state)
    bound, _ = run(DeviceSeen(H100), state=unbound)
    assert group_of(bound, H100.address) == NVML_GROUP and bound.naming == {}


def test_the_nvidia_minor_comes_from_the_driver_else_from_nvml() -> None:
    state = named()
    assert state.nvidia_minor(H100.address) == 5  # no proc file read: NVML's
    state, _ = run(DeviceSeen(attrs.evolve(H100, nvidia_minor=2)), state=state)
    assert state.nvidia_minor(H100.address) == 2  # the driver's own file wins
    assert state.nvidia_minor("0000:ee:00.0") is None


# Changed with NVIDIA's catalog (issue 34): XID 48 and unknown XIDs need a reset (no longer
# "unhealthy"), and every description names the catalog's action.
@pytest.mark.parametrize(
    ("xid", "health", "desc"),
    [
        (13, None, ""),
        (
            48,
            "needs reset",
            "XID 48 (double-bit ECC error in GPU memory; NVIDIA: WORKFLOW_XID_48): "
            "needs a reset; recovery: reset the GPU",
        ),
        (
            79,
            "unhealthy",
            "XID 79 (the GPU has fallen off the bus; NVIDIA: RESTART_BM): "
            "unhealthy; recovery: reboot the node",
        ),
        (
            999,
            "needs reset",
            "XID 999 (not in NVIDIA's XID catalog): needs a reset; recovery: reset the GPU "
            "(xid_unknown = drain)",
        ),
    ],
)
def test_an_xid_is_counted_and_judged(xid: int, health: str | None, desc: str) -> None:
    state, _ = run(XidReported(H100.address, xid), XidReported(H100.address, xid), state=named())
    attributes = device_json(state, H100.address)["attributes"]
    assert attributes["last_xid"] == {"value": xid} and attributes["xid_count"] == {"value": 2}
    device = device_json(state, H100.address)
    assert device["healthy"] is (health is None)
    assert device.get("health") == health and device["health_desc"] == desc


@pytest.mark.parametrize(
    ("kind", "action", "health", "desc"),
    [
        (
            "double_bit_ecc",
            None,
            "needs reset",
            "double-bit ECC error: needs a reset; recovery: reset the GPU",
        ),
        (
            "gpu_unavailable",
            None,
            "unhealthy",
            "NVML reports the GPU unavailable: unhealthy; recovery: reset the GPU",
        ),
        (
            "recovery_action",
            2,
            "unhealthy",
            "the driver asks to reboot the node (recovery action NODE_REBOOT): "
            "unhealthy; recovery: reboot the node",
        ),
    ],
)
def test_nvml_health_events(kind: str, action: int | None, health: str, desc: str) -> None:
    state, _ = run(NvmlEventReported(H100.address, kind, action), state=named())
    device = device_json(state, H100.address)
    assert device["healthy"] is False and device["health_desc"] == desc
    assert device["health"] == health


def test_recovery_action_none_clears_xid_errors_and_says_why() -> None:
    state, _ = run(XidReported(H100.address, 48), state=named())
    reduction = decide(state, NvmlEventReported(H100.address, "recovery_action", 0))
    assert device_json(reduction.state, H100.address)["healthy"] is True
    assert reduction.recoveries == {
        H100.address: "the driver reports it usable again (recovery action NONE)"
    }


def test_a_pci_recovery_clears_an_xid_but_not_nvml_being_unreachable() -> None:
    state, _ = run(
        XidReported(H100.address, 48),
        NvmlUnreachable(H100.address, "NVML not responding (y)"),
        PciErrorReported(H100.address, "SUCCESSFUL_RECOVERY", True),
        state=named(),
    )
    assert device_json(state, H100.address)["health_desc"] == "NVML not responding (y)"


def test_a_new_xid_policy_judges_the_xids_that_made_gpus_unhealthy_again() -> None:
    state, _ = run(XidReported(H100.address, 79), state=named())
    reduction = decide(state, XidPolicyChanged(XidPolicy(ignore=frozenset({79}))))
    assert device_json(reduction.state, H100.address)["healthy"] is True
    assert reduction.recoveries == {H100.address: "the XID policy no longer counts XID 79"}
    off, _ = run(XidPolicyChanged(XidPolicy(enabled=False)), XidReported(H100.address, 48))
    assert off.problems == {}


def test_nvml_targets_are_the_nvidia_bound_gpus_with_their_resets() -> None:
    state, _ = run(
        DeviceSeen(H100),
        DeviceSeen(attrs.evolve(H100_B, driver="vfio-pci")),
        DeviceSeen(NIC),
        PciErrorReported(H100.address, "BEGIN_RECOVERY", False),
        PciErrorReported(H100.address, "SUCCESSFUL_RECOVERY", True),
        state=WAITING,
    )
    assert nvml_targets(state) == {H100.address: 1}  # waiting for a name, and reset once


def test_an_empty_nvml_name_leaves_the_database_name() -> None:
    state, _ = run(DeviceSeen(H100), NvmlGpuSeen(attrs.evolve(GPU, name="")), state=WAITING)
    assert group_of(state, H100.address) == GROUP
    assert device_json(state, H100.address)["attributes"]["uuid"] == {"value": GPU.uuid}


@pytest.mark.parametrize(
    "uuid", ["GPU-a", H100_B.address, f"{GPU_UUID},all", f"{GPU_UUID}\x1b", "", "MIG-" + "0" * 8]
)
def test_a_uuid_not_in_nvidias_form_names_no_gpu_and_makes_it_unhealthy(uuid: str) -> None:
    state, _ = run(DeviceSeen(H100), NvmlGpuSeen(attrs.evolve(GPU, uuid=uuid)), state=WAITING)
    device = device_json(state, H100.address)
    assert device["healthy"] is False
    assert device["health_desc"].startswith("NVML reported a malformed UUID (")
    assert "\x1b" not in device["health_desc"]
    assert "uuid" not in device["attributes"]
    state, _ = run(NvmlGpuSeen(GPU), state=state)  # read again, sound: healthy again
    device = device_json(state, H100.address)
    assert device["healthy"] is True and device["attributes"]["uuid"] == {"value": GPU_UUID}


def test_a_uuid_nvml_gives_two_gpus_names_neither_until_they_differ() -> None:
    other = attrs.evolve(GPU, address=H100_B.address)
    state, _ = run(
        DeviceSeen(H100), DeviceSeen(H100_B), NvmlGpuSeen(GPU), NvmlGpuSeen(other), state=WAITING
    )
    for address in (H100.address, H100_B.address):
        device = device_json(state, address)
        assert device["healthy"] is False
        assert (
            device["health_desc"] == f"NVML reported one UUID for {H100.address}, {H100_B.address}"
        )
        assert "uuid" not in device["attributes"]
    state, _ = run(NvmlGpuSeen(GPU), state=state)  # read again: still shared, still refused
    assert device_json(state, H100.address)["healthy"] is False
    apart = attrs.evolve(other, uuid="GPU-0b0b0b0b-5555-6666-7777-888888888888")
    state, _ = run(NvmlGpuSeen(apart), state=state)
    assert device_json(state, H100.address)["attributes"]["uuid"] == {"value": GPU_UUID}
    assert all(device_json(state, a)["healthy"] for a in (H100.address, H100_B.address))

"""What the journal is told of a fold: devices that came and went, health, lease changes."""

from __future__ import annotations

import attrs

from monitor.core.events import (
    DeviceGone,
    DeviceSeen,
    NvmlGpuSeen,
    NvmlNameWaitOver,
    PciErrorReported,
    XidReported,
)
from monitor.core.state import State
from monitor.core.transitions import (
    DeviceMoved,
    HealthTransition,
    LeaseWarning,
    WorkFailed,
    journal_entries,
)
from tests.pure.examples import (
    GPU,
    GROUP,
    H100,
    H100_B,
    NVML_GROUP,
    NVML_NAME,
    ROOT,
    decide,
    group_of,
    reserve,
    run,
)


def entries(state: State, *events: object) -> list[object]:
    return list(journal_entries(state, decide(state, *events)))  # type: ignore[arg-type]


def test_healthy_arrivals_and_every_departure_are_entries() -> None:
    state = State()
    unhealthy = attrs.evolve(H100_B, driver=None)
    found = entries(state, DeviceSeen(H100), DeviceSeen(unhealthy))
    assert found[0] == DeviceMoved("added", H100.address, "nvidia", "H100 SXM5 80GB")
    assert isinstance(found[1], HealthTransition) and found[1].kind == "unhealthy"
    assert found[1].health_desc == "no kernel driver bound" and len(found) == 2
    state, _ = run(DeviceSeen(H100), DeviceSeen(unhealthy))
    assert entries(state, DeviceGone(H100.address), DeviceGone(H100_B.address)) == [
        DeviceMoved("removed", H100.address, "nvidia", "H100 SXM5 80GB"),
        DeviceMoved("removed", H100_B.address, "nvidia", "H100 SXM5 80GB"),
    ]


def test_a_recovery_names_its_evidence_and_a_lost_device_its_action() -> None:
    state, _ = run(DeviceSeen(H100))
    [lost] = entries(state, PciErrorReported(H100.address, "FAILED_RECOVERY", False))
    assert isinstance(lost, HealthTransition) and lost.kind == "lost"
    assert lost.recovery_action == "reset or replace the device"
    state, _ = run(PciErrorReported(H100.address, "FAILED_RECOVERY", False), state=state)
    [recovered] = entries(state, PciErrorReported(H100.address, "SUCCESSFUL_RECOVERY", True))
    assert isinstance(recovered, HealthTransition) and recovered.kind == "recovered"
    assert recovered.reason == "the kernel reported a successful PCI error recovery"


def test_a_gpu_rebound_and_waiting_for_its_name_is_not_gone_and_its_recovery_is_told() -> None:
    # NVML never named it (the wait ran out): bound again, it waits for NVML's name
    state, _ = run(DeviceSeen(H100), NvmlNameWaitOver(H100.address, 1),
                   XidReported(H100.address, 48), state=State(nvml_names=True))  # fmt: skip
    state, _ = run(DeviceSeen(attrs.evolve(H100, driver=None)), state=state)
    [recovered] = entries(state, DeviceSeen(H100))  # bound again: hidden until NVML names it
    assert isinstance(recovered, HealthTransition) and recovered.kind == "recovered"
    assert recovered.reason == "its driver was rebound"
    assert "XID 48" in recovered.health_desc and recovered.device_name == "H100 SXM5 80GB"


def test_a_driver_reload_keeps_nvmls_name_and_is_neither_a_removal_nor_an_add() -> None:
    state, _ = run(DeviceSeen(H100), NvmlGpuSeen(GPU), XidReported(H100.address, 79),
                   state=State(nvml_names=True))  # fmt: skip
    unbound = attrs.evolve(H100, driver=None)
    [unhealthy] = entries(state, DeviceSeen(unbound))  # rmmod nvidia
    assert isinstance(unhealthy, HealthTransition) and unhealthy.kind == "lost"  # still XID 79
    assert unhealthy.device_name == NVML_NAME and "no kernel driver bound" in unhealthy.health_desc
    state, _ = run(DeviceSeen(unbound), state=state)
    assert group_of(state, H100.address) == NVML_GROUP
    [recovered] = entries(state, DeviceSeen(H100))  # modprobe nvidia: shown throughout
    assert isinstance(recovered, HealthTransition) and recovered.kind == "recovered"
    assert recovered.reason == "its driver was rebound" and recovered.device_name == NVML_NAME
    state, _ = run(DeviceSeen(H100), state=state)
    assert group_of(state, H100.address) == NVML_GROUP and H100.address not in state.naming
    # a GPU unbound while healthy: unhealthy (no driver), never lost, and back without a move
    state, _ = run(DeviceSeen(H100), NvmlGpuSeen(GPU), state=State(nvml_names=True))
    [unbound_entry] = entries(state, DeviceSeen(unbound))
    assert isinstance(unbound_entry, HealthTransition) and unbound_entry.kind == "unhealthy"
    state, _ = run(DeviceSeen(unbound), state=state)
    [back] = entries(state, DeviceSeen(H100))
    assert isinstance(back, HealthTransition) and back.kind == "recovered"


def test_lease_changes_and_warnings_for_reserved_devices_that_break() -> None:
    state, _ = run(DeviceSeen(H100))
    found = entries(state, reserve(H100.address))
    assert [type(e).__name__ for e in found] == ["LeaseChange"]
    state, _ = run(reserve(H100.address), state=state)
    found = entries(state, PciErrorReported(H100.address, "BEGIN_RECOVERY", False))
    warning = next(e for e in found if isinstance(e, LeaseWarning))
    assert warning.lease.id == "lease-1" and "recovery in progress" in warning.health_desc
    assert NVML_NAME not in GROUP  # the database's group, not NVML's


def test_an_application_xid_on_a_leased_gpu_names_whose_work_it_ended() -> None:
    held = reserve(H100.address, peer=ROOT, lease_id="r-app")
    state, _ = run(DeviceSeen(H100), NvmlGpuSeen(GPU), held, state=State(nvml_names=True))
    [failed] = entries(state, XidReported(H100.address, 13))  # RESTART_APP: the GPU is fine
    assert isinstance(failed, WorkFailed) and failed.lease.id == "r-app"
    assert (failed.device_id, failed.xid) == (H100.address, 13)
    assert failed.desc.startswith("XID 13 (graphics engine exception")
    # an XID that needs a reset is a lease warning, said once, not also a failed application
    found = entries(state, XidReported(H100.address, 109))
    assert [type(e) for e in found] == [HealthTransition, LeaseWarning]
    # nobody's work on a GPU that no one holds
    free, _ = run(DeviceSeen(H100), NvmlGpuSeen(GPU), state=State(nvml_names=True))
    assert entries(free, XidReported(H100.address, 13)) == []

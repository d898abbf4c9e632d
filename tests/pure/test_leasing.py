"""The leasing rules, by plain calls: who may reserve and release what, and when leases end."""

from __future__ import annotations

import attrs
import pytest

from monitor.core.answers import Grant, Reason, Refusal, Released
from monitor.core.events import (
    ConnectionClosed,
    DeviceGone,
    DeviceSeen,
    Event,
    LeaseEnded,
    NvmlGpuSeen,
    PciErrorReported,
    ReconcileRequested,
)
from monitor.core.reducer import durable_leases, fold_unrecorded
from monitor.core.rules.leasing import may_reserve
from monitor.core.state import State
from tests.pure.examples import (
    ACCESS,
    GPU,
    GROUP,
    H100,
    H100_B,
    HOLDER,
    IN_A_CONTAINER,
    MEMBER,
    NIC,
    OTHER_MEMBER,
    OUTSIDER,
    ROOT,
    decide,
    device_json,
    release,
    reserve,
    run,
)


def host() -> State:
    state, _ = run(DeviceSeen(H100), DeviceSeen(H100_B), DeviceSeen(NIC))
    return state


def answer(state: State, request: object) -> object:
    reduction = decide(state, request)  # type: ignore[arg-type]
    return reduction.answers[request.token]  # type: ignore[attr-defined]


def refusal(state: State, request: object) -> Refusal:
    found = answer(state, request)
    assert isinstance(found, Refusal), found
    return found


def test_a_reserve_is_granted_all_or_nothing_and_shows_in_the_snapshot() -> None:
    request = reserve(H100.address, H100_B.address, holder=HOLDER, connection=None)
    reduction = decide(host(), request)
    grant = reduction.answers[request.token]
    assert isinstance(grant, Grant)
    lease = grant.lease
    assert (lease.id, lease.uid, lease.gid, lease.pid, lease.holder) == (
        "lease-1", MEMBER.uid, MEMBER.gid, MEMBER.pid, HOLDER,
    )  # fmt: skip
    assert dict(lease.devices) == {H100.address: GROUP, H100_B.address: GROUP}
    assert [d.id for _, d in grant.devices] == [H100.address, H100_B.address]
    assert device_json(reduction.state, H100.address)["reserved_by"] == "lease-1"
    [change] = reduction.lease_changes
    assert (change.kind, change.devices) == ("granted", (H100.address, H100_B.address))
    assert change.reason == "granted to uid 1000 (pid 100)"


def test_a_grant_carries_the_devices_and_minors_as_they_were_decided() -> None:
    state, _ = run(NvmlGpuSeen(GPU), state=host())
    request = reserve(GPU.uuid)  # a UUID is a device ID too
    grant = answer(state, request)
    assert isinstance(grant, Grant)
    assert dict(grant.nvidia_minors) == {H100.address: 5}
    assert dict(grant.devices[0][1].attributes)["uuid"].value == GPU.uuid


def test_only_members_of_the_group_may_reserve() -> None:
    refused = refusal(host(), reserve(H100.address, peer=OUTSIDER))
    assert refused.reason is Reason.FORBIDDEN and refused.data == {"uid": OUTSIDER.uid}
    assert isinstance(answer(host(), reserve(H100.address, peer=OTHER_MEMBER)), Grant)
    assert isinstance(answer(host(), reserve(H100.address, peer=ROOT)), Grant)


def test_a_holder_is_refused_from_another_pid_namespace_and_before_any_lookup() -> None:
    refused = refusal(host(), reserve(H100.address, peer=IN_A_CONTAINER, holder=HOLDER))
    assert refused.reason is Reason.INVALID and "another PID namespace" in refused.message
    assert isinstance(answer(host(), reserve(H100.address, peer=IN_A_CONTAINER)), Grant)
    # what the server asks before it looks a holder up: an outsider is refused alike
    assert may_reserve(ACCESS, OUTSIDER, 1) == may_reserve(ACCESS, OUTSIDER, 99999)
    assert may_reserve(ACCESS, MEMBER, 1) is None


def test_unknown_devices_are_refused_with_the_reason_each_names_nothing() -> None:
    state, _ = run(DeviceSeen(attrs.evolve(H100_B, address="0000:af:00.0")), state=host())
    waiting, _ = run(DeviceSeen(attrs.evolve(H100, address="0000:d8:00.0")), state=attrs.evolve(
        state, nvml_names=True))  # fmt: skip
    refused = refusal(waiting, reserve("0000:99:00.0", NIC.address, "0000:d8:00.0", H100.address))
    assert refused.reason is Reason.UNKNOWN_DEVICE
    assert refused.data == {"device_ids": ["0000:99:00.0", NIC.address, "0000:d8:00.0"]}
    assert refused.message == (
        "No such device on this host: 0000:99:00.0. "
        "0000:01:00.0 is not followed: it is a network controller (class 0x020000), which "
        "serve --match-class 0x02 would follow. "
        "0000:d8:00.0 is not shown yet: it waits for NVML to name it."
    )


def test_unhealthy_and_held_devices_are_refused_naming_why_and_whom() -> None:
    state, _ = run(PciErrorReported(H100.address, "FAILED_RECOVERY", False), state=host())
    refused = refusal(state, reserve(H100.address, H100_B.address))
    assert refused.reason is Reason.UNHEALTHY and refused.data is not None
    assert list(refused.data["health"]) == [H100.address]
    held, _ = run(reserve(H100_B.address, holder=HOLDER), state=host())
    refused = refusal(held, reserve(H100.address, H100_B.address, lease_id="lease-2"))
    assert refused.reason is Reason.RESERVED and refused.message == (
        f"Already reserved: {H100_B.address} by lease-1."
    )
    assert refused.data == {
        "device_ids": [H100_B.address],
        "holders": {
            H100_B.address: {
                "reservation_id": "lease-1", "uid": 1000, "pid": 100, "holder_pid": HOLDER.pid,
                "owner": None,
            }
        },
    }  # fmt: skip
    assert held.leases.keys() == {"lease-1"}  # and the free device was not granted either


def test_release_by_devices_names_what_was_not_reserved() -> None:
    state, _ = run(reserve(H100.address, H100_B.address), state=host())
    request = release(H100.address)
    reduction = decide(state, request)
    assert reduction.answers[request.token] == Released((H100.address,), ())
    assert dict(reduction.state.leases["lease-1"].devices) == {H100_B.address: GROUP}
    request = release(H100.address, H100_B.address)
    reduction = decide(reduction.state, request)
    assert reduction.answers[request.token] == Released((H100_B.address,), (H100.address,))
    assert reduction.state.leases == {}  # a lease left with no device ends
    [change] = reduction.lease_changes
    assert (change.kind, change.devices) == ("released", (H100_B.address,))
    assert change.reason == "released by uid 1000 (pid 100)"


def test_release_by_reservation_id() -> None:
    state, _ = run(reserve(H100.address, H100_B.address, lease_id="lease-9"), state=host())
    released = answer(state, release(lease_id="lease-9"))
    assert released == Released((H100.address, H100_B.address), ())
    refused = refusal(state, release(lease_id="nope"))
    assert refused.reason is Reason.INVALID and refused.message == "No reservation nope is held."


def test_releasing_an_unknown_or_unfollowed_device_is_refused() -> None:
    refused = refusal(host(), release("0000:99:00.0"))
    assert refused.reason is Reason.UNKNOWN_DEVICE
    assert "not followed" in refusal(host(), release(NIC.address)).message
    assert refusal(host(), release("not-an-id")).data == {"device_ids": ["not-an-id"]}


def test_only_the_leases_own_user_or_root_may_release_it() -> None:
    state, _ = run(reserve(H100.address), state=host())
    refused = refusal(state, release(H100.address, peer=OTHER_MEMBER))
    assert refused.reason is Reason.FORBIDDEN and refused.data == {"reservation_ids": ["lease-1"]}
    assert refusal(state, release(H100.address, peer=OUTSIDER)).data == {"uid": OUTSIDER.uid}
    assert answer(state, release(H100.address, peer=ROOT)) == Released((H100.address,), ())


def test_a_lease_ends_with_its_holder_or_its_connection() -> None:
    state, _ = run(
        reserve(H100.address, holder=HOLDER),
        reserve(H100_B.address, lease_id="lease-2", connection=7),
        state=host(),
    )
    assert durable_leases(state).keys() == {"lease-1"}
    reduction = decide(state, LeaseEnded("lease-1"), ConnectionClosed(7))
    assert reduction.state.leases == {}
    assert [(c.kind, c.lease.id, c.reason) for c in reduction.lease_changes] == [
        ("ended", "lease-1", f"its holder process {HOLDER.pid} exited"),
        ("ended", "lease-2", "its connection closed"),
    ]
    assert decide(state, LeaseEnded("nope"), ConnectionClosed(8)).patch is None


def test_a_reserved_device_that_leaves_stays_shown_until_its_lease_ends() -> None:
    state, _ = run(reserve(H100.address), DeviceGone(H100.address), state=host())
    device = device_json(state, H100.address)
    assert device["healthy"] is False and device["reserved_by"] == "lease-1"
    assert device["health_desc"] == "removed from this host while reserved by lease-1"
    state, _ = run(release(H100.address), state=state)
    with pytest.raises(KeyError):
        device_json(state, H100.address)


def test_a_fold_whose_leases_cannot_be_written_refuses_the_requests_alone() -> None:
    request = reserve(H100.address)
    events: list[Event] = [request, PciErrorReported(H100_B.address, "BEGIN_RECOVERY", False)]
    reduction = fold_unrecorded(host(), events, "cannot write leases.json: read-only")
    assert reduction.state.leases == {}
    assert device_json(reduction.state, H100_B.address)["healthy"] is False
    refused = reduction.answers[request.token]
    assert isinstance(refused, Refusal) and refused.reason is Reason.NOT_RECORDED
    assert refused.message == (
        "The daemon could not record the change on disk, so it did not make it: "
        "cannot write leases.json: read-only."
    )


# --- owners: schedulers that allocate and never release --------------------------------------


def test_an_owner_takes_its_own_devices_again_and_no_one_elses() -> None:
    state, _ = run(reserve(H100.address, owner="batch"), state=host())
    assert device_json(state, H100.address)["reserved_owner"] == "batch"
    request = reserve(H100.address, H100_B.address, owner="batch", lease_id="lease-2")
    reduction = decide(state, request)
    grant = reduction.answers[request.token]
    assert isinstance(grant, Grant) and grant.lease.owner == "batch"
    assert reduction.state.leases.keys() == {"lease-2"}  # the new lease replaces the old
    assert [(c.kind, c.lease.id, c.reason) for c in reduction.lease_changes] == [
        ("released", "lease-1", "replaced by lease-2 of the same owner"),
        ("granted", "lease-2", "granted to uid 1000 (pid 100) for batch"),
    ]
    for other in (
        reserve(H100.address, lease_id="x"),
        reserve(H100.address, owner="kubelet", peer=ROOT),
    ):
        assert refusal(state, other).reason is Reason.RESERVED  # anyone else, as before
    plain, _ = run(reserve(H100.address), state=host())
    assert refusal(plain, reserve(H100.address, owner="batch")).reason is Reason.RESERVED


def test_an_owners_lease_has_no_holder_and_no_connection() -> None:
    for request in (
        reserve(H100.address, owner="batch", holder=HOLDER),
        reserve(H100.address, owner="batch", connection=7),
    ):
        assert refusal(host(), request).reason is Reason.INVALID
    assert refusal(host(), reserve(H100.address, owner="batch", peer=OUTSIDER)).reason is (
        Reason.FORBIDDEN
    )


def test_reconcile_ends_the_owners_leases_on_every_device_it_no_longer_uses() -> None:
    state, _ = run(
        reserve(H100.address, owner="kubelet", peer=ROOT),
        reserve(H100_B.address, owner="kubelet", peer=ROOT, lease_id="lease-2"),
        state=host(),
    )
    used = (H100.address, "0000:99:00.0")  # a device the daemon does not know holds nothing
    reduction = decide(state, ReconcileRequested(99, ROOT, "kubelet", used))
    assert reduction.answers[99] == Released((H100_B.address,), ())
    assert reduction.state.leases.keys() == {"lease-1"}
    [change] = reduction.lease_changes
    assert change.reason == "reconciled by kubelet (uid 0, pid 1)"
    assert decide(state, ReconcileRequested(98, ROOT, "nomad", ())).patch is None  # not its
    refused = decide(state, ReconcileRequested(97, OUTSIDER, "kubelet", ())).answers[97]
    assert isinstance(refused, Refusal) and refused.reason is Reason.FORBIDDEN


def test_an_operator_clears_an_owners_leftovers_and_no_member_speaks_for_the_owner() -> None:
    state, _ = run(
        reserve(H100.address, owner="nomad", peer=ROOT),
        reserve(H100_B.address, owner="nomad", peer=ROOT, lease_id="lease-2"),
        state=host(),
    )
    # naming the owner no longer lets another member release its lease (issue 24)
    for asked in (release(H100.address, peer=OTHER_MEMBER, owner="nomad"), release(H100.address)):
        assert refusal(state, asked).reason is Reason.FORBIDDEN
    request = release(peer=ROOT, owner="nomad")  # every lease of that owner
    reduction = decide(state, request)
    assert reduction.answers[request.token] == Released((H100.address, H100_B.address), ())
    assert reduction.state.leases == {}

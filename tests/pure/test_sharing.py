"""Time-sliced sharing, by plain calls: replicas listed, leased, broken, removed and recounted."""

from __future__ import annotations

import logging
from typing import Any

import attrs
import pytest

from monitor.core.answers import Grant, Reason, Refusal, Released
from monitor.core.events import (
    ClassFilterChanged,
    DeviceGone,
    DeviceSeen,
    DrmNodeSeen,
    Event,
    NvmlGpuSeen,
    PciErrorReported,
    SharePolicyChanged,
)
from monitor.core.fingerprint import build_fingerprint
from monitor.core.leases import Lease
from monitor.core.reducer import fold
from monitor.core.replicas import SharePolicy, ShareRule, base_id, split
from monitor.core.rules.sharing import measured, sysfs_measured
from monitor.core.state import State
from monitor.core.transitions import DeviceMoved, HealthTransition, LeaseWarning, journal_entries
from monitor.outputs import logs
from monitor.outputs.cdi import build_lease_spec, build_spec
from monitor.serving import requests
from tests.pure.examples import (
    ACCESS,
    CARD,
    GPU,
    GPU_UUID,
    H100,
    H100_B,
    MEMBER,
    NIC,
    OTHER_MEMBER,
    ROOT,
    decide,
    device_json,
    group_of,
    release,
    reserve,
    run,
)

A, B = H100.address, H100_B.address
SHARED = "nvidia/gpu.shared/H100 SXM5 80GB"
WHOLE = "nvidia/gpu/H100 SXM5 80GB"


FOUR = SharePolicy(replicas=4)


def shared_host(policy: SharePolicy = FOUR) -> State:
    state, _ = run(
        SharePolicyChanged(policy), DeviceSeen(H100), DeviceSeen(H100_B), DeviceSeen(NIC)
    )
    return state


def answer(state: State, request: object) -> tuple[State, object]:
    reduction = decide(state, request)  # type: ignore[arg-type]
    return reduction.state, reduction.answers[request.token]  # type: ignore[attr-defined]


def granted(state: State, *ids: str, lease_id: str = "lease-1", **more: Any) -> State:
    state, found = answer(state, reserve(*ids, lease_id=lease_id, **more))
    assert isinstance(found, Grant), found
    return state


def ids_in(state: State, group: str) -> list[str]:
    found = state.fingerprint.groups.get(group)
    return list(found.devices) if found is not None else []


def test_a_shared_gpu_is_listed_as_its_replicas_alone_in_a_shared_group() -> None:
    state = shared_host()
    assert ids_in(state, SHARED) == [f"{a}::{k}" for a in (A, B) for k in range(4)]
    assert WHOLE not in state.fingerprint.groups  # the GPUs are not offered whole
    assert group_of(state, NIC.address) is None  # not followed: never shared
    replica = device_json(state, f"{A}::2")
    assert replica["hw_locality"] == {"pci_bus_id": A}  # a replica is where its GPU is
    assert replica["attributes"]["replica"] == {"value": 2}
    assert replica["attributes"]["numa_node"] == {"value": 1}  # the GPU's attributes
    group = state.fingerprint.groups[SHARED]
    assert (group.vendor, group.type, group.name) == ("nvidia", "gpu.shared", "H100 SXM5 80GB")
    assert group.to_json()["attributes"]["replicas"] == {"value": 4}
    assert "replica" not in group.to_json()["attributes"]  # differs per replica


def test_the_incremental_fingerprint_is_the_full_one_through_every_sharing_change() -> None:
    events: list[Event] = [
        SharePolicyChanged(SharePolicy(replicas=3)),
        DeviceSeen(H100),
        DeviceSeen(H100_B),
        reserve(f"{A}::1"),
        SharePolicyChanged(SharePolicy(replicas=2)),
        PciErrorReported(A, "BEGIN_RECOVERY", None),
        DeviceGone(A),
        release(f"{A}::1"),
        SharePolicyChanged(SharePolicy()),
        DeviceSeen(H100),
    ]
    state = State(access=ACCESS)
    for event in events:
        state = fold(state, [event]).state
        assert state.fingerprint == build_fingerprint(state), event


@pytest.mark.parametrize(
    ("rules", "counts"),
    [
        ((ShareRule("10de:2330", 4),), {A: 4, B: 4}),
        ((ShareRule("10de:9999", 4),), {A: 2, B: 2}),  # no match: the default
        ((ShareRule("10de", 3),), {A: 3, B: 3}),
        ((ShareRule("nvidia/gpu", 5), ShareRule("10de", 3)), {A: 5, B: 5}),  # first wins
        ((ShareRule("gpu", 1),), {}),  # a rule may keep a class whole
        ((ShareRule("nvidia/gpu/H100 SXM5 80GB", 6),), {A: 6, B: 6}),
        ((ShareRule("nvidia/gpu/another name", 6),), {A: 2, B: 2}),
    ],
)
def test_rules_match_pci_ids_or_groups_first_to_last(
    rules: tuple[ShareRule, ...], counts: dict[str, int]
) -> None:
    state = shared_host(SharePolicy(replicas=2, rules=rules))
    assert dict(state.replicas) == counts


def test_a_rule_by_group_name_follows_nvmls_name() -> None:
    rule = ShareRule("nvidia/gpu/NVIDIA H100 80GB HBM3", 2)
    state = State(access=ACCESS, nvml_names=True)  # an H100 bound to nvidia waits for its name
    state, _ = run(SharePolicyChanged(SharePolicy(rules=(rule,))), DeviceSeen(H100), state=state)
    assert dict(state.replicas) == {} and state.fingerprint.groups == {}
    state, _ = run(NvmlGpuSeen(GPU), state=state)
    assert dict(state.replicas) == {A: 2}
    assert ids_in(state, "nvidia/gpu.shared/NVIDIA H100 80GB HBM3") == [f"{A}::0", f"{A}::1"]


@pytest.mark.parametrize("device_id", [A, GPU_UUID])
def test_a_shared_gpu_is_not_reserved_whole_and_the_refusal_names_its_replicas(
    device_id: str,
) -> None:
    state, _ = run(NvmlGpuSeen(GPU), state=shared_host())
    _, found = answer(state, reserve(device_id))
    assert isinstance(found, Refusal)
    assert found.reason is Reason.UNKNOWN_DEVICE
    assert f"{device_id} is shared as 4 replicas ({A}::0 to {A}::3)" in found.message
    assert found.data == {
        "device_ids": [device_id],
        "replicas": {device_id: [f"{A}::{k}" for k in range(4)]},
    }


def test_two_replicas_of_one_gpu_go_to_two_holders_with_the_same_edits() -> None:
    state, _ = run(NvmlGpuSeen(GPU), DrmNodeSeen(CARD), state=shared_host())
    first = decide(state, reserve(f"{A}::0", lease_id="lease-1"))
    second_request = reserve(f"{A}::1", peer=OTHER_MEMBER, lease_id="lease-2")
    second = decide(first.state, second_request)
    grants = [first.answers[max(first.answers)], second.answers[second_request.token]]
    assert all(isinstance(g, Grant) for g in grants)
    exists = {"/dev/nvidia5", "/dev/nvidiactl"}.__contains__
    edits = [requests.reserved(g, exists) for g in grants]  # type: ignore[arg-type]
    assert [e["device_ids"] for e in edits] == [[f"{A}::0"], [f"{A}::1"]]
    for e in edits:
        e.pop("reservation_id"), e.pop("device_ids")
    assert edits[0] == edits[1]
    assert edits[0]["envs"] == {"NVIDIA_VISIBLE_DEVICES": GPU_UUID}
    assert [d["host_path"] for d in edits[0]["devices"]] == [
        "/dev/nvidia5", "/dev/nvidiactl", "/dev/dri/card1",
    ]  # fmt: skip
    holders = {i: device_json(second.state, i).get("reserved_by") for i in ids_in(state, SHARED)}
    assert holders[f"{A}::0"] == "lease-1" and holders[f"{A}::1"] == "lease-2"
    assert holders[f"{A}::2"] is None
    _, refused = answer(second.state, reserve(f"{A}::1", peer=ROOT, lease_id="lease-3"))
    assert isinstance(refused, Refusal) and refused.reason is Reason.RESERVED


def test_two_replicas_in_one_request_are_one_set_of_edits_unless_refused() -> None:
    state, _ = run(NvmlGpuSeen(GPU), state=shared_host())
    both = (f"{A}::0", f"{A}::3")
    _, grant = answer(state, reserve(*both))
    assert isinstance(grant, Grant)
    edits = requests.reserved(grant, {"/dev/nvidia5"}.__contains__)
    assert edits["envs"] == {"NVIDIA_VISIBLE_DEVICES": GPU_UUID}
    assert [d["host_path"] for d in edits["devices"]] == ["/dev/nvidia5"]
    strict = SharePolicy(replicas=4, fail_requests_greater_than_one=True)
    state, _ = run(SharePolicyChanged(strict), state=state)
    _, refused = answer(state, reserve(*both))
    assert isinstance(refused, Refusal) and refused.reason is Reason.INVALID
    assert "fail_requests_greater_than_one" in refused.message
    assert refused.data == {"device_ids": list(both)}
    _, fine = answer(state, reserve(f"{A}::0", f"{B}::0"))  # one replica of each GPU
    assert isinstance(fine, Grant)


def test_replicas_of_a_gpu_that_breaks_break_and_recover_with_it() -> None:
    state = granted(shared_host(), f"{A}::1")
    state, _ = run(PciErrorReported(A, "BEGIN_RECOVERY", None), state=state)
    for k in range(4):
        replica = device_json(state, f"{A}::{k}")
        assert replica["healthy"] is False
        assert "recovery in progress" in replica["health_desc"]
    assert device_json(state, f"{B}::0")["healthy"] is True
    _, refused = answer(state, reserve(f"{A}::2"))
    assert isinstance(refused, Refusal) and refused.reason is Reason.UNHEALTHY
    state, _ = run(PciErrorReported(A, "SUCCESSFUL_RECOVERY", None), state=state)
    assert all(device_json(state, f"{A}::{k}")["healthy"] for k in range(4))


def test_the_health_alert_of_a_shared_gpu_is_one_entry_naming_every_holder(
    caplog: pytest.LogCaptureFixture,
) -> None:
    state = granted(shared_host(), f"{A}::0", lease_id="lease-1")
    state = granted(state, f"{A}::2", peer=OTHER_MEMBER, lease_id="lease-2")
    reduction = fold(state, [PciErrorReported(A, "FAILED_RECOVERY", None)])
    entries = journal_entries(state, reduction)
    alerts = [e for e in entries if isinstance(e, HealthTransition)]
    assert [(a.kind, a.device_id) for a in alerts] == [("lost", A)]  # once, not per replica
    assert alerts[0].holders == (
        "reservation lease-1 (uid 1000, pid 100)",
        "reservation lease-2 (uid 1001, pid 101)",
    )
    warned = [(e.lease.id, e.device_id) for e in entries if isinstance(e, LeaseWarning)]
    assert warned == [("lease-1", f"{A}::0"), ("lease-2", f"{A}::2")]
    with caplog.at_level(logging.INFO):
        logs.report_health(logging.getLogger("test"), alerts[0])
    assert (
        "held by reservation lease-1 (uid 1000, pid 100); reservation lease-2 (uid 1001, pid 101)"
        in caplog.text
    )


def test_a_shared_gpu_arriving_and_leaving_is_one_journal_entry_not_one_per_replica() -> None:
    base = run(SharePolicyChanged(SharePolicy(replicas=4)))[0]
    added = fold(base, [DeviceSeen(H100)])
    moves = [(e.kind, e.device_id) for e in journal_entries(base, added)]  # type: ignore[union-attr]
    assert moves == [("added", A)]
    assert all(isinstance(e, DeviceMoved) for e in journal_entries(base, added))
    gone = fold(added.state, [DeviceGone(A)])
    entries = journal_entries(added.state, gone)
    assert [(e.kind, e.device_id) for e in entries if isinstance(e, DeviceMoved)] == [
        ("removed", A)
    ]
    assert len(entries) == 1


def test_replicas_leave_with_their_gpu_and_a_held_one_stays_until_released() -> None:
    state = granted(shared_host(), f"{A}::1")
    state, _ = run(DeviceGone(A), state=state)
    assert ids_in(state, SHARED) == [f"{A}::1"] + [f"{B}::{k}" for k in range(4)]
    departed = device_json(state, f"{A}::1")
    assert (departed["healthy"], departed["reserved_by"]) == (False, "lease-1")
    assert departed["hw_locality"] == {"pci_bus_id": A}
    assert A not in state.replicas
    assert requests.leases(state)["leases"][0]["orphaned"] == [f"{A}::1"]
    state, done = answer(state, release(f"{A}::1"))
    assert isinstance(done, Released) and done.released == (f"{A}::1",)
    assert ids_in(state, SHARED) == [f"{B}::{k}" for k in range(4)]


def test_a_gpu_back_with_its_replicas_held_gets_at_least_as_many_as_they_name() -> None:
    lease = Lease(id="kept", devices={f"{A}::5": SHARED}, uid=0, gid=0, pid=1, created=1.0)
    state = State(access=ACCESS, leases={lease.id: lease})  # restored from disk at a start
    state, _ = run(SharePolicyChanged(SharePolicy(replicas=2)), DeviceSeen(H100), state=state)
    assert state.replicas[A] == 6
    assert device_json(state, f"{A}::5")["healthy"] is True
    state, _ = run(release(f"{A}::5", peer=ROOT), state=state)
    assert state.replicas[A] == 2  # the policy's, once nobody holds one


def test_a_new_count_applies_at_once_to_free_gpus_and_waits_for_held_ones() -> None:
    state = granted(shared_host(), f"{A}::3")
    reduction = fold(state, [SharePolicyChanged(SharePolicy(replicas=2))])
    state = reduction.state
    assert dict(state.replicas) == {A: 4, B: 2}
    assert reduction.notes == (
        f"{A} stays at 4 replicas until its reservations end (lease-1); "
        "then it will have 2 replicas",
    )
    assert ids_in(state, SHARED) == [f"{A}::{k}" for k in range(4)] + [f"{B}::0", f"{B}::1"]
    reduction = fold(state, [release(f"{A}::3")])
    assert dict(reduction.state.replicas) == {A: 2, B: 2}
    assert reduction.notes == ()  # told once, at the change


def test_a_gpu_leased_whole_stays_whole_until_released() -> None:
    state = granted(shared_host(SharePolicy()), A)
    reduction = fold(state, [SharePolicyChanged(SharePolicy(replicas=3))])
    assert dict(reduction.state.replicas) == {B: 3}
    assert group_of(reduction.state, A) == WHOLE
    assert reduction.notes == (
        f"{A} stays at no replicas (leased whole) until its reservations end (lease-1); "
        "then it will have 3 replicas",
    )
    state, _ = run(release(A), state=reduction.state)
    assert dict(state.replicas) == {A: 3, B: 3}
    assert group_of(state, A) is None and group_of(state, f"{A}::0") == SHARED


def test_a_device_that_leaves_the_class_filter_loses_its_replicas() -> None:
    state, _ = run(ClassFilterChanged(("12",)), state=shared_host())
    assert dict(state.replicas) == {}
    assert state.fingerprint.groups == {}


def test_replica_leases_are_stored_and_read_back_and_only_that_form_is_new() -> None:
    state = granted(shared_host(), f"{A}::0", f"{B}::3", holder=None)
    lease = state.leases["lease-1"]
    assert Lease.from_json(lease.to_json()) == lease
    for bad in (f"{A}::", f"{A}::x", f"{A}::01", f"{A}::100", "GPU-1::0", f"{A}:0", "a::0"):
        raw = attrs.evolve(lease, devices={bad: SHARED}).to_json()
        with pytest.raises(ValueError, match="is not a PCI address or replica ID"):
            Lease.from_json(raw)


def test_the_cdi_spec_names_each_replica_with_its_gpus_edits() -> None:
    state, _ = run(NvmlGpuSeen(GPU), state=shared_host())
    exists = {"/dev/nvidia5", "/dev/nvidiactl"}.__contains__
    spec = build_spec(state, exists)
    entries = {d["name"]: d["containerEdits"] for d in spec["devices"]}
    gpu = {"path": "/dev/nvidia5", "hostPath": "/dev/nvidia5", "permissions": "rwm"}
    assert [n for n in entries if base_id(n) == A or n == GPU_UUID] == [
        f"{A}::0", A, GPU_UUID, f"{A}::1", f"{A}::2", f"{A}::3",
    ]  # fmt: skip
    assert all(gpu in entries[n]["deviceNodes"] for n in (A, f"{A}::0", f"{A}::3", GPU_UUID))
    state = granted(state, f"{A}::1", lease_id="lease-1")
    state = granted(state, f"{A}::2", peer=OTHER_MEMBER, lease_id="lease-2")
    leased = build_lease_spec(state, exists)
    assert [d["name"] for d in leased["devices"]] == ["lease-1", "lease-2"]
    assert leased["devices"][0]["containerEdits"] == leased["devices"][1]["containerEdits"]


def test_replica_ids_split_back_to_their_device() -> None:
    assert split(f"{A}::12") == (A, 12)
    assert split(A) == (A, None)
    assert split("GPU-x::y") == ("GPU-x::y", None)
    assert base_id(f"{A}::0") == A


def test_a_member_may_hold_a_replica_another_holds_beside() -> None:
    state = granted(shared_host(), f"{A}::0", peer=MEMBER)
    state, found = answer(state, release(f"{A}::0", peer=OTHER_MEMBER))
    assert isinstance(found, Refusal) and found.reason is Reason.FORBIDDEN


def test_statistics_are_sampled_and_kept_for_a_shared_gpu_by_its_address() -> None:
    amd = attrs.evolve(H100_B, vendor_id=0x1002, device_id=0x74A1, driver="amdgpu", model="MI")
    state, _ = run(
        SharePolicyChanged(SharePolicy(replicas=2)),
        DeviceSeen(H100),
        DeviceSeen(amd),
        NvmlGpuSeen(GPU),
        state=State(access=ACCESS),
    )
    assert measured(state) == {A, B}  # the replicas' figures are their GPU's
    assert sysfs_measured(state) == [B]  # A is NVML's to read; never a path of a replica ID

"""Properties of the core over generated sequences of every kind of event and request.

The profiles (tests/conftest.py) make these deterministic by default and in CI; the exploring
profile draws new examples each run.
"""

from __future__ import annotations

import copy
from typing import Any

import attrs
import json_merge_patch
from hypothesis import given
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
    MigLayoutSeen,
    MigMinorsRead,
    NvmlAbsent,
    NvmlEventReported,
    NvmlGpu,
    NvmlGpuSeen,
    NvmlNameWaitOver,
    NvmlReachable,
    NvmlUnreachable,
    PciErrorReported,
    PciFacts,
    ReconcileRequested,
    ReleaseRequested,
    ReserveRequested,
    Resync,
    SharePolicyChanged,
    XidPolicyChanged,
    XidReported,
)
from monitor.core.fingerprint import build_fingerprint
from monitor.core.mig import MigInstance, MigLayout, parse_mig_minors
from monitor.core.model import Attribute
from monitor.core.pci import class_matches
from monitor.core.reducer import fold
from monitor.core.replicas import SharePolicy, ShareRule, base_id, split
from monitor.core.rules.inventory import database_name
from monitor.core.state import State
from monitor.core.xids import XidPolicy
from tests.pure.examples import ACCESS, HOLDER, MEMBER, OTHER_MEMBER, OUTSIDER, ROOT

ADDRESSES = ["0000:3b:00.0", "0000:5e:00.0", "0000:af:00.0", "0000:01:00.0"]
UUIDS = ["GPU-0a0a0a0a-1111-2222-3333-444444444444", "GPU-0b0b0b0b-5555-6666-7777-888888888888"]
DRM_NAMES = ["card0", "card1", "renderD128", "renderD129", "card0-DP-1"]
LEASE_IDS = ["lease-1", "lease-2", "lease-3"]
# Replica IDs, of devices that may be shared or not, and one beyond any count given below.
REPLICAS = [f"{ADDRESSES[0]}::0", f"{ADDRESSES[0]}::1", f"{ADDRESSES[1]}::2", f"{ADDRESSES[2]}::5"]
SHARE_POLICIES = [
    SharePolicy(),
    SharePolicy(replicas=2),
    SharePolicy(rules=(ShareRule("10de", 3),)),
    SharePolicy(
        replicas=2, rules=(ShareRule("1002:74a1", 1),), fail_requests_greater_than_one=True
    ),
]
# MIG devices of the first two addresses: two layouts each, sharing one instance, and one UUID
# in the old form; MIG mode off; MIG mode on without instances.
MIGS = [f"MIG-{k}{k}{k}{k}{k}{k}{k}{k}-1111-4111-8111-111111111111" for k in "1234"]
MIG_LAYOUTS = [
    MigLayout(
        True, (MigInstance(MIGS[0], 9, 0, 1, 1, 9984), MigInstance(MIGS[1], 2, 0, 3, 3, 40448))
    ),
    MigLayout(
        True, (MigInstance(MIGS[0], 9, 0, 1, 1, 9984), MigInstance(MIGS[2], 1, 0, 4, 4, 40448))
    ),
    MigLayout(
        True,
        (MigInstance(MIGS[3], 0, 0, 7, 7, 81152), MigInstance("MIG-GPU-a/1/0", 1, 0, 1, 1, 9984)),
    ),
    MigLayout(False),
    MigLayout(True),
]
PEERS = [ROOT, MEMBER, OTHER_MEMBER, OUTSIDER, attrs.evolve(MEMBER, in_our_pid_namespace=False)]

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
tokens = st.integers(0, 1 << 30)
peers = st.sampled_from(PEERS)
owners = st.sampled_from([None, None, "nomad", "kubelet"])
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
        token=tokens,
        peer=peers,
        device_ids=st.lists(
            st.sampled_from([*ADDRESSES, *UUIDS, *REPLICAS, *MIGS, "0000:ee:00.0"]),
            min_size=1,
            max_size=3,
        ),
        lease_id=st.sampled_from(LEASE_IDS),
        created=st.just(0.0),
        holder=st.sampled_from([None, HOLDER]),
        connection=st.sampled_from([None, 7]),
        owner=owners,
    ),
    st.builds(
        ReleaseRequested,
        token=tokens,
        peer=peers,
        lease_id=st.sampled_from([None, *LEASE_IDS]),
        device_ids=st.lists(
            st.sampled_from([*ADDRESSES, *REPLICAS, *MIGS, "not-an-id"]), max_size=2
        ),
        owner=owners,
    ),
    st.builds(
        ReconcileRequested,
        token=tokens,
        peer=peers,
        owner=st.sampled_from(["nomad", "kubelet"]),
        device_ids=st.lists(st.sampled_from([*ADDRESSES, *UUIDS, *REPLICAS]), max_size=3),
    ),
    st.builds(LeaseEnded, st.sampled_from(LEASE_IDS)),
    st.builds(ConnectionClosed, st.just(7)),
    st.builds(
        NvmlGpuSeen,
        st.builds(
            NvmlGpu,
            address=st.sampled_from(ADDRESSES),
            uuid=st.sampled_from([*UUIDS, "GPU-a", ADDRESSES[0]]),  # two malformed
            name=st.sampled_from(["NVIDIA H100 80GB HBM3", "NVIDIA A100"]),
            attributes=st.sampled_from([{}, {"memory": Attribute(81559, "MiB")}]),
        ),
    ),
    st.builds(XidReported, st.sampled_from(ADDRESSES), st.sampled_from([13, 48, 79, 999])),
    st.builds(
        XidReported,
        st.sampled_from(ADDRESSES[:2]),
        st.sampled_from([13, 48]),
        gpu_instance=st.sampled_from([None, 9, 2]),
        compute_instance=st.sampled_from([None, 0]),
    ),
    st.builds(MigLayoutSeen, st.sampled_from(ADDRESSES[:2]), st.sampled_from(MIG_LAYOUTS)),
    st.builds(
        MigMinorsRead,
        st.sampled_from([parse_mig_minors("gpu0/gi9/access 84\ngpu0/gi9/ci0/access 85\n")]),
    ),
    st.builds(
        NvmlEventReported,
        st.sampled_from(ADDRESSES),
        st.sampled_from(["double_bit_ecc", "gpu_unavailable", "recovery_action"]),
        st.sampled_from([None, 0, 1, 2]),
    ),
    st.builds(NvmlUnreachable, st.sampled_from(ADDRESSES), st.just("NVML not responding")),
    st.builds(NvmlReachable, st.sampled_from(ADDRESSES)),
    st.builds(NvmlNameWaitOver, st.sampled_from(ADDRESSES), st.integers(0, 6)),
    st.just(NvmlAbsent()),
    st.builds(
        XidPolicyChanged,
        st.sampled_from([XidPolicy(), XidPolicy(ignore=frozenset({48, 79})), XidPolicy(False)]),
    ),
    st.builds(SharePolicyChanged, st.sampled_from(SHARE_POLICIES)),
)


def expected_replicas(state: State, truth: Resync) -> dict[str, int]:
    """The replica counts after a resync (issue 28): the policy's for a device no lease holds;
    a device held whole stays whole; one whose replicas are held keeps its count if it stayed
    the same device, else gets as many as the leases name (at least the policy's)."""
    counts = {}
    for facts in truth.devices:
        address = facts.address
        want = 1
        if class_matches(facts.pci_class, state.match_classes):
            want = next(
                (r.replicas for r in state.share.rules if _matches(r.match, facts)),
                state.share.replicas,
            )
        numbers = [
            split(d)[1] for lease in state.leases.values() for d in lease.devices
            if base_id(d) == address
        ]  # fmt: skip
        before = state.devices.get(address)
        same = before is not None and identity(before) == identity(facts)
        have = state.replicas.get(address, 1) if same else 1
        if not numbers:
            count = want
        elif None in numbers:
            count = 1
        elif have > 1:
            count = have
        else:
            count = max(want, *(k + 1 for k in numbers if k is not None))
        if count > 1:
            counts[address] = count
    return counts


def _matches(match: str, facts: PciFacts) -> bool:
    vendor, _, device = match.partition(":")
    return int(vendor, 16) == facts.vendor_id and (not device or int(device, 16) == facts.device_id)


def identity(facts: PciFacts) -> tuple[int, int, int]:
    """What makes a PCI function the same device: its IDs and class."""
    return facts.vendor_id, facts.device_id, facts.pci_class


first_states = st.sampled_from([State(access=ACCESS), State(access=ACCESS, nvml_names=True)])


@given(first_states, st.lists(event_st, max_size=40))
def test_patches_applied_in_order_rebuild_the_final_snapshot(
    state: State, events: list[Event]
) -> None:
    mirror = state.fingerprint.to_json()
    for event in events:
        before = state.fingerprint.to_json()
        generation = state.generation
        reduction = fold(state, [event])
        state, patch = reduction.state, reduction.patch
        after = state.fingerprint.to_json()
        if patch is None:
            assert after == before and state.generation == generation
        else:
            assert after != before and state.generation == generation + 1
            mirror = json_merge_patch.merge(copy.deepcopy(mirror), patch)
        assert mirror == after
        # built from the changed devices and the rest of the last one: as if built from scratch
        assert state.fingerprint == build_fingerprint(state)
        held = [d for lease in state.leases.values() for d in lease.devices]
        assert len(held) == len(set(held))  # no device in two leases
        whole = {d for d in held if split(d)[1] is None}
        assert not any(base_id(d) in whole for d in held if split(d)[1] is not None)  # 3b
        for device_id in held:  # a held MIG device is one its GPU has now, not held whole
            if device_id.startswith("MIG-"):
                found = state.mig_instance(device_id)
                assert found is not None and found[0] not in whole, (device_id, whole)
        for device_id in held:  # a held replica is shown, or its device is gone
            address, k = split(device_id)
            if k is not None and address in state.devices:
                assert k < state.replicas.get(address, 1), (device_id, state.replicas)


@given(first_states, st.lists(event_st, max_size=40))
def test_a_device_keeps_its_group_while_it_keeps_its_driver(
    state: State, events: list[Event]
) -> None:
    """Whichever source answers first: a device shown in a group stays in it for as long as it
    stays on the host bound to the same driver."""
    groups: dict[str, tuple[Any, str]] = {}  # address -> ((driver, IDs), group when shown)
    for event in events:
        state = fold(state, [event]).state
        shown = {i: key for key, g in state.fingerprint.groups.items() for i in g.devices}
        for address in list(groups):
            facts = state.devices.get(address)
            if facts is None or (facts.driver, identity(facts)) != groups[address][0]:
                del groups[address]  # gone, another device or binding: it may be named afresh
        for address, key in shown.items():
            facts = state.devices.get(address)
            if facts is None:
                continue  # departed, shown for its lease
            if address in groups:
                assert groups[address][1] == key, (address, groups[address], key)
            else:
                groups[address] = ((facts.driver, identity(facts)), key)


@given(first_states, st.lists(event_st, max_size=30), truth_st)
def test_resync_from_any_state_yields_the_truth(
    first: State, events: list[Event], truth: Resync
) -> None:
    """A resync makes the inventory the truth; what other sources said (NVML's name and facts,
    XID counts, health only events tell) is kept for devices that stayed with their driver."""
    state = fold(first, events).state
    synced = fold(state, [truth]).state
    assert dict(synced.devices) == {f.address: f for f in truth.devices}
    assert dict(synced.drm_nodes) == {n.name: n for n in truth.drm_nodes}
    stayed = {  # the same device, bound to the same driver
        f.address
        for f in truth.devices
        if f.address in state.devices
        and (state.devices[f.address].driver, identity(state.devices[f.address]))
        == (f.driver, identity(f))
    }
    # A driver reload: a GPU unbound from nvidia keeps its name, and one bound to nvidia again
    # keeps the name NVML gave it (any but the database's), so that it is shown throughout.
    reloaded = {
        f.address
        for f in truth.devices
        if (before := state.devices.get(f.address)) is not None
        and f.address not in stayed
        and identity(before) == identity(f)
        and f.vendor_id == 0x10DE
        and f.address in state.names
        and (
            (before.driver == "nvidia" and f.driver is None)
            or (
                before.driver is None
                and f.driver == "nvidia"
                and state.names[f.address] != database_name(f)
            )
        )
    }
    fresh = fold(attrs.evolve(first, match_classes=state.match_classes, share=state.share,
                              nvml_names=state.nvml_names), [truth]).state  # fmt: skip

    def kept(field: str, also: frozenset[str] = frozenset()) -> dict[str, Any]:
        return {a: v for a, v in getattr(state, field).items() if a in stayed | also}

    named = stayed | reloaded
    expected = attrs.evolve(
        fresh,
        names={
            **{a: n for a, n in fresh.names.items() if a not in named},
            **kept("names", frozenset(reloaded)),
        },
        naming={**{a: n for a, n in fresh.naming.items() if a not in named}, **kept("naming")},
        nvml={a: g for a, g in kept("nvml").items() if state.devices[a].driver == "nvidia"},
        xids={a: x for a, x in kept("xids").items() if state.devices[a].driver == "nvidia"},
        xid_sources={
            a: x for a, x in kept("xid_sources").items() if state.devices[a].driver == "nvidia"
        },
        leases=state.leases,
        replicas=expected_replicas(state, truth),
    )

    def without_health(s: State) -> dict[str, Any]:
        snapshot = build_fingerprint(s).to_json()
        for group in snapshot["groups"].values():
            for device in group["devices"].values():
                del device["healthy"], device["health_desc"]
                device.pop("health", None)  # needs reset or unhealthy: health too
        return snapshot

    assert without_health(synced) == without_health(expected)
    for address, facts in synced.devices.items():
        if synced.problems.get(address):  # health only events can give: from before, kept
            before = state.devices.get(address)
            assert before is not None and identity(before) == identity(facts)
            assert state.problems.get(address)
    names = {a for a in synced.names if a not in named}
    assert all(synced.names[a] == database_name(synced.devices[a]) for a in names)
    assert fold(synced, [truth]).patch is None  # a second identical resync changes nothing

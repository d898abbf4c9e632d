"""MIG under generated sequences: two NVIDIA GPUs repartitioned, leased whole, by instance and
by replica, removed and re-added, shared and not, with XIDs naming instances; the snapshot
follows by patches, is the one built afresh, and no instance is shown or held beside a lease
that blocks it."""

from __future__ import annotations

import copy

import json_merge_patch
from hypothesis import given
from hypothesis import strategies as st

from monitor.core.events import (
    DeviceGone,
    DeviceSeen,
    Event,
    LeaseEnded,
    MigLayoutSeen,
    MigMinorsRead,
    NvmlEventReported,
    NvmlGpu,
    NvmlGpuSeen,
    PciFacts,
    ReleaseRequested,
    ReserveRequested,
    SharePolicyChanged,
    XidReported,
)
from monitor.core.fingerprint import build_fingerprint
from monitor.core.mig import parse_mig_minors
from monitor.core.reducer import fold
from monitor.core.replicas import SharePolicy, ShareRule, base_id, split
from monitor.core.state import State
from monitor.sim.mig import mig_minors_text
from tests.pure.examples import ACCESS, MEMBER, OTHER_MEMBER, ROOT
from tests.pure.test_properties import (
    ADDRESSES,
    LEASE_IDS,
    MIG_LAYOUTS,
    MIGS,
    SHARE_POLICIES,
    UUIDS,
    tokens,
)

# MIG, where it happens: two NVIDIA GPUs bound to nvidia and named, repartitioned, leased whole
# and by instance, removed and re-added, with XIDs naming instances.
MIG_GPUS = [
    PciFacts(a, 0x10DE, 0x2330, 0x030200, driver="nvidia", model="H100 SXM5 80GB")
    for a in ADDRESSES[:2]
]
mig_event_st: st.SearchStrategy[Event] = st.one_of(
    st.builds(MigLayoutSeen, st.sampled_from(ADDRESSES[:2]), st.sampled_from(MIG_LAYOUTS)),
    st.builds(
        ReserveRequested,
        token=tokens,
        peer=st.sampled_from([MEMBER, OTHER_MEMBER]),
        device_ids=st.lists(
            st.sampled_from([*ADDRESSES[:2], *MIGS, f"{ADDRESSES[0]}::1", f"{MIGS[0]}::1"]),
            min_size=1,
            max_size=2,
        ),
        lease_id=st.sampled_from(LEASE_IDS),
        created=st.just(0.0),
    ),
    st.builds(
        ReleaseRequested,
        token=tokens,
        peer=st.just(ROOT),
        lease_id=st.sampled_from([None, *LEASE_IDS]),
        device_ids=st.lists(st.sampled_from([*ADDRESSES[:2], *MIGS]), max_size=2),
    ),
    st.builds(LeaseEnded, st.sampled_from(LEASE_IDS)),
    st.builds(
        SharePolicyChanged,
        st.sampled_from([*SHARE_POLICIES[:2], SharePolicy(rules=(ShareRule("mig", 2),))]),
    ),
    st.builds(DeviceGone, st.sampled_from(ADDRESSES[:2])),
    st.builds(DeviceSeen, st.sampled_from(MIG_GPUS)),
    st.builds(
        XidReported,
        st.sampled_from(ADDRESSES[:2]),
        st.sampled_from([13, 48, 79]),
        gpu_instance=st.sampled_from([None, 9, 2, 0]),
        compute_instance=st.sampled_from([None, 0]),
    ),
    st.builds(
        NvmlEventReported, st.sampled_from(ADDRESSES[:2]), st.just("recovery_action"), st.just(0)
    ),
    st.builds(
        MigMinorsRead,
        st.sampled_from(
            [
                parse_mig_minors(""),
                parse_mig_minors("gpu0/gi9/access 84\ngpu0/gi9/ci0/access 85\n"),
                parse_mig_minors(mig_minors_text(2)),
            ]
        ),
    ),
)


def mig_first_state() -> State:
    state = State(access=ACCESS)
    gpus = [
        NvmlGpu(f.address, UUIDS[k], "NVIDIA H100 80GB HBM3", k) for k, f in enumerate(MIG_GPUS)
    ]
    minors = MigMinorsRead(parse_mig_minors(mig_minors_text(2)))
    layout = MigLayoutSeen(ADDRESSES[0], MIG_LAYOUTS[0])
    events: list[Event] = [*map(DeviceSeen, MIG_GPUS), *map(NvmlGpuSeen, gpus), minors, layout]
    for event in events:
        state = fold(state, [event]).state
    return state


@given(st.lists(mig_event_st, max_size=30))
def test_mig_devices_follow_their_layouts_and_leases(events: list[Event]) -> None:
    state = mig_first_state()
    mirror = state.fingerprint.to_json()
    for event in events:
        reduction = fold(state, [event])
        state = reduction.state
        if reduction.patch is not None:
            mirror = json_merge_patch.merge(copy.deepcopy(mirror), reduction.patch)
        assert mirror == state.fingerprint.to_json()
        assert state.fingerprint == build_fingerprint(state)
        held = [d for lease in state.leases.values() for d in lease.devices]
        assert len(held) == len(set(held))
        shown = state.fingerprint.devices()
        for address in ADDRESSES[:2]:
            instances = state.mig_instances(address)
            sliced = any(base_id(d) == address for d in held)  # held whole or as replicas
            if not sliced and address in state.devices and address not in state.replicas:
                for i in instances:  # shown whole, or as its replicas
                    assert (i.uuid in shown) != (f"{i.uuid}::0" in shown), i.uuid
                assert (address in shown) == (not instances)
            else:
                blocked = [d for d in shown if base_id(d) in {i.uuid for i in instances}]
                assert not blocked  # by those leases
        for device_id in held:  # a held replica of a MIG device is one it has now
            uuid, k = split(device_id)
            if k is not None and uuid.startswith("MIG-"):
                assert k < state.replicas.get(uuid, 1), (device_id, state.replicas)
            if device_id.startswith("MIG-"):
                found = state.mig_instance(device_id)
                assert found is not None, device_id
                assert not any(base_id(d) == found[0] for d in held), device_id

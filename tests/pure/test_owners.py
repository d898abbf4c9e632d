"""Owner names bound to identities, by plain calls (issue 24, item 1): the schedulers' names
belong to root, a mapped name to its identities, any other to the uid that first used it."""

from __future__ import annotations

import attrs

from monitor.core.access import Access, Identity, Peer, stranded
from monitor.core.answers import Grant, Reason, Refusal, Released
from monitor.core.events import ReconcileRequested
from monitor.core.leases import Lease
from monitor.core.state import State
from tests.pure.examples import (
    ACCESS,
    GROUP_ID,
    H100,
    H100_B,
    MEMBER,
    OTHER_MEMBER,
    ROOT,
    release,
    reserve,
    run,
)
from tests.pure.test_leasing import answer, host, refusal

BATCH_GID = 5000
BATCH_MEMBER = Peer(pid=103, uid=1003, gid=GROUP_ID, groups=frozenset({BATCH_GID}))
READER_GID = 4343
READER = Peer(pid=104, uid=1004, gid=1004, groups=frozenset({READER_GID}))


def forbidden(state: State, request: object, owner: str) -> Refusal:
    refused = refusal(state, request)
    assert refused.reason is Reason.FORBIDDEN, refused
    assert refused.data is not None and refused.data["owner"] == owner
    assert f"owner name {owner} belongs to" in refused.message
    return refused


def test_a_member_may_not_take_release_or_reconcile_the_schedulers_names() -> None:
    """The attack: any member of the group could `release --owner kubelet --all`, reconcile
    root's Nomad leases away, or reserve as kubelet a device a pod holds."""
    state, _ = run(
        reserve(H100.address, owner="kubelet", peer=ROOT),
        reserve(H100_B.address, owner="nomad", peer=ROOT, lease_id="lease-2"),
        state=host(),
    )
    refused = forbidden(state, release(peer=MEMBER, owner="kubelet"), "kubelet")
    assert refused.message == (
        "The owner name kubelet belongs to root and the daemon's user; "
        "uid 1000 may not release under it."
    )
    forbidden(state, release(H100.address, peer=MEMBER, owner="kubelet"), "kubelet")
    forbidden(state, release(H100.address, peer=MEMBER), "kubelet")  # its lease, unnamed
    forbidden(state, release(lease_id="lease-2", peer=MEMBER), "nomad")
    forbidden(state, ReconcileRequested(90, MEMBER, "nomad", ()), "nomad")
    forbidden(state, reserve(H100.address, owner="kubelet", lease_id="x"), "kubelet")
    assert state.leases.keys() == {"lease-1", "lease-2"}
    assert answer(state, ReconcileRequested(91, ROOT, "nomad", ())) == Released((H100_B.address,))


def test_an_unmapped_name_belongs_to_the_uid_that_first_used_it() -> None:
    state, _ = run(reserve(H100.address, owner="batch"), state=host())
    other = forbidden(state, reserve(H100_B.address, owner="batch", peer=OTHER_MEMBER), "batch")
    assert "uid 1000 (who first used it) and root" in other.message
    forbidden(state, release(peer=OTHER_MEMBER, owner="batch"), "batch")
    forbidden(state, release(H100.address, peer=OTHER_MEMBER), "batch")
    forbidden(state, ReconcileRequested(92, OTHER_MEMBER, "batch", ()), "batch")
    # its first user and root may
    grant = answer(state, reserve(H100_B.address, owner="batch", lease_id="lease-2"))
    assert isinstance(grant, Grant)
    assert answer(state, ReconcileRequested(93, ROOT, "batch", ())) == Released((H100.address,))
    # the binding is its leases: restored from disk with them, free again once none is left
    released, _ = run(release(owner="batch"), state=state)
    grant = answer(released, reserve(H100.address, owner="batch", peer=OTHER_MEMBER))
    assert isinstance(grant, Grant)


def test_a_mapped_name_belongs_to_its_identities_and_root() -> None:
    access = attrs.evolve(
        ACCESS,
        owners={"batch": (Identity(gid=BATCH_GID),), "kubelet": (Identity(uid=MEMBER.uid),)},
    )
    state, _ = run(state=attrs.evolve(host(), access=access))
    state, _ = run(reserve(H100.address, owner="kubelet"), state=state)  # mapped to MEMBER
    forbidden(state, reserve(H100_B.address, owner="batch"), "batch")  # not in the group
    granted, _ = run(
        reserve(H100_B.address, owner="batch", peer=BATCH_MEMBER, lease_id="lease-2"),
        state=state,
    )
    assert granted.leases["lease-2"].owner == "batch"
    refused = forbidden(granted, release(lease_id="lease-2"), "batch")
    assert "belongs to group 5000, root" in refused.message
    assert answer(granted, release(lease_id="lease-2", peer=ROOT)) == Released((H100_B.address,))


def test_a_read_only_member_reads_and_is_told_why_it_may_change_nothing() -> None:
    state = attrs.evolve(host(), access=attrs.evolve(ACCESS, read_gid=READER_GID))
    assert state.access.read_only(READER) and not state.access.read_only(MEMBER)
    for request in (
        reserve(H100.address, peer=READER),
        release(H100.address, peer=READER),
        ReconcileRequested(94, READER, "batch", ()),
    ):
        refused = refusal(state, request)
        assert refused.reason is Reason.FORBIDDEN
        assert "uid 1004 is in the daemon's read-only group" in refused.message


def test_leases_whose_user_may_no_longer_use_their_owner_are_named() -> None:
    def lease(lease_id: str, uid: int, owner: str, created: float) -> Lease:
        return Lease(lease_id, {H100.address: "g/t/n"}, uid, uid, 1, created, owner=owner)

    leases = [
        lease("a", 1000, "kubelet", 1.0),  # a member, before the schedulers' names were root's
        lease("b", 0, "nomad", 1.0),
        lease("c", 1000, "batch", 1.0),  # batch's first user
        lease("d", 1001, "batch", 2.0),  # another member, back when anyone could
        lease("e", 1001, "mapped", 1.0),
        lease("f", 1001, "grouped", 1.0),  # a group's: its members are not on record
    ]
    owners = {"mapped": (Identity(uid=1002),), "grouped": (Identity(gid=BATCH_GID),)}
    access = Access(GROUP_ID, 0, owners=owners)
    assert [found.id for found in stranded(access, leases)] == ["a", "d", "e"]

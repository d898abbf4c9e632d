"""Who asks, and what they may do: root, the daemon's own user, one group's members, a read-only
group's members, and the identities each owner name belongs to.

A peer is what the kernel said of the process at the other end of the socket when it connected
(``SO_PEERCRED``, ``SO_PEERGROUPS``), never what a request says. The serving layer finds these
facts; the rules here decide what they allow.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import attrs

from monitor.core.leases import Lease
from monitor.core.model import frozen_mapping, frozen_tuple

# Owner names that stand for the host's schedulers: only root and the daemon's own user speak
# for them, unless the config maps them to other identities.
SCHEDULERS = ("kubelet", "nomad")


@attrs.frozen
class Peer:
    pid: int  # in the daemon's PID namespace; 0 when the kernel could not map it
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()  # supplementary groups
    # Whether the peer lives in the daemon's PID namespace, so that PIDs it names are ours.
    in_our_pid_namespace: bool = True

    def in_group(self, gid: int | None) -> bool:
        return gid is not None and (self.gid == gid or gid in self.groups)


@attrs.frozen
class Identity:
    """Who an owner name is mapped to: one uid, or the members of one group."""

    uid: int | None = None
    gid: int | None = None

    def matches(self, peer: Peer) -> bool:
        return peer.uid == self.uid if self.uid is not None else peer.in_group(self.gid)

    def __str__(self) -> str:
        return f"uid {self.uid}" if self.uid is not None else f"group {self.gid}"


def _identities(
    owners: Mapping[str, Iterable[Identity]],
) -> Mapping[str, tuple[Identity, ...]]:
    return frozen_mapping({name: frozen_tuple(ids) for name, ids in owners.items()})


@attrs.frozen
class Access:
    gid: int | None = None  # the group that may reserve and release; None: no group
    own_uid: int = 0  # the daemon's user
    read_gid: int | None = None  # a group that may connect and read, and nothing else
    # Owner names mapped to who may use them (the config's [owners]); root always may.
    owners: Mapping[str, tuple[Identity, ...]] = attrs.field(converter=_identities, factory=dict)

    def privileged(self, peer: Peer) -> bool:
        """Root and the daemon's own user."""
        return peer.uid in (0, self.own_uid)

    def may_change(self, peer: Peer) -> bool:
        """Whether ``peer`` may reserve and release."""
        return self.privileged(peer) or peer.in_group(self.gid)

    def read_only(self, peer: Peer) -> bool:
        """A member of the read-only group, and nothing more."""
        return not self.may_change(peer) and peer.in_group(self.read_gid)

    def identities(self, owner: str) -> tuple[Identity, ...] | None:
        """Who ``owner`` is mapped to (the schedulers: no one but root and the daemon's user);
        None for a name that belongs to whoever first used it."""
        mapped = self.owners.get(owner)
        if mapped is not None:
            return mapped
        return () if owner in SCHEDULERS else None


def first_user(leases: Iterable[Lease], owner: str) -> int | None:
    """The uid an unmapped owner name belongs to: that of its oldest lease, the first use the
    daemon still has a record of; None when it holds none."""
    theirs = [lease for lease in leases if lease.owner == owner]
    if not theirs:
        return None
    return min(theirs, key=lambda lease: (lease.created, lease.id)).uid


def may_use_owner(access: Access, leases: Iterable[Lease], peer: Peer, owner: str) -> bool:
    """Whether ``peer`` may reserve, release or reconcile under ``owner``."""
    if access.privileged(peer):
        return True
    identities = access.identities(owner)
    if identities is not None:
        return any(identity.matches(peer) for identity in identities)
    first = first_user(leases, owner)
    return first is None or first == peer.uid


def owner_belongs_to(access: Access, leases: Iterable[Lease], owner: str) -> str:
    """Who may use ``owner``, in words: "root and the daemon's user", "uid 1001, group 3000
    and root", "uid 1000 (who first used it) and root"."""
    identities = access.identities(owner)
    if identities is not None:
        named = [str(identity) for identity in identities]
        return ", ".join([*named, "root"]) if named else "root and the daemon's user"
    first = first_user(leases, owner)
    if first is None:
        return "whoever uses it first"
    return f"uid {first} (who first used it) and root"


def stranded(access: Access, leases: Iterable[Lease]) -> list[Lease]:
    """Owner leases whose own user may not use their owner name now (made before owner names
    were bound to identities, or before the config mapped the name): they stay, and only root
    or the name's identities may end them. Judged by the uid and primary group recorded, the
    only groups a lease keeps: a lease of a name mapped to a group is given the benefit of the
    doubt."""
    leases = list(leases)
    found = []
    for lease in leases:
        if lease.owner is None:
            continue
        identities = access.identities(lease.owner)
        if identities is not None and any(i.gid is not None for i in identities):
            continue
        peer = Peer(lease.pid, lease.uid, lease.gid)
        if not may_use_owner(access, leases, peer, lease.owner):
            found.append(lease)
    return found

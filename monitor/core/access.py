"""Who asks, and who may change leases: root, the daemon's own user, and one group's members.

A peer is what the kernel said of the process at the other end of the socket when it connected
(``SO_PEERCRED``, ``SO_PEERGROUPS``), never what a request says. The serving layer finds these
facts; the rules here decide what they allow.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Peer:
    pid: int  # in the daemon's PID namespace; 0 when the kernel could not map it
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()  # supplementary groups
    # Whether the peer lives in the daemon's PID namespace, so that PIDs it names are ours.
    in_our_pid_namespace: bool = True


@attrs.frozen
class Access:
    gid: int | None = None  # the group that may reserve and release; None: no group
    own_uid: int = 0  # the daemon's user

    def privileged(self, peer: Peer) -> bool:
        """Root and the daemon's own user."""
        return peer.uid in (0, self.own_uid)

    def may_change(self, peer: Peer) -> bool:
        """Whether ``peer`` may reserve and release."""
        if self.privileged(peer):
            return True
        return self.gid is not None and (peer.gid == self.gid or self.gid in peer.groups)

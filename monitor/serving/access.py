"""Who may change leases: root, the daemon's own user, and members of one configured group.

Anyone who can connect may read (the socket's mode and group decide who can connect). The
peer's uid, gid and groups come from the kernel (``SO_PEERCRED``, ``SO_PEERGROUPS``) as they
were when it connected, never from the request, and each request is checked against them: the
same groups the kernel used to let the peer open the socket, with no user database lookup.
"""

from __future__ import annotations

import errno
import grp
import os
import socket
import struct

import attrs

DEFAULT_GROUP = "hotplug-monitor"


class UnknownGroup(Exception):
    pass


SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13; Python names it from 3.14 on
GID_SIZE = struct.calcsize("I")
MAX_GROUPS = 65536  # the kernel's NGROUPS_MAX


@attrs.frozen
class Peer:
    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()  # supplementary groups


def peer_of(sock: socket.socket) -> Peer:
    """The process at the other end of a Unix socket, as the kernel saw it connect."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid, _peer_groups(sock))


def _peer_groups(sock: socket.socket) -> frozenset[int]:
    for count in (64, MAX_GROUPS):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, count * GID_SIZE)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                continue  # more groups than we asked room for
            return frozenset()  # an older kernel: the primary group still counts
        return frozenset(struct.unpack(f"{len(raw) // GID_SIZE}I", raw))
    return frozenset()


MAX_GID = (1 << 32) - 2  # (gid_t) -1 means "no change" to chown


def resolve_group(name: str | None) -> int | None:
    """The gid of ``name``; with no name, that of ``hotplug-monitor`` if it exists, else None."""
    try:
        return grp.getgrnam(name or DEFAULT_GROUP).gr_gid
    except KeyError:
        if name is None:
            return None
        if name.isascii() and name.isdigit():
            if int(name) > MAX_GID:
                raise UnknownGroup(f"group ID {name} is out of range (at most {MAX_GID})") from None
            return int(name)
        raise UnknownGroup(f"no group named {name!r} on this host") from None


class Access:
    def __init__(self, gid: int | None, own_uid: int | None = None) -> None:
        self.gid = gid
        self.own_uid = os.geteuid() if own_uid is None else own_uid

    def privileged(self, peer: Peer) -> bool:
        """Root and the daemon's own user: never kept out by other users' connections."""
        return peer.uid in (0, self.own_uid)

    def may_change(self, peer: Peer) -> bool:
        """Whether ``peer`` may reserve and release."""
        if self.privileged(peer):
            return True
        return self.gid is not None and (peer.gid == self.gid or self.gid in peer.groups)


class ConnectionCount:
    """Connections open now: per uid, and in the two pools the limits keep apart."""

    def __init__(self) -> None:
        self.per_uid: dict[int, int] = {}
        self.privileged = 0
        self.others = 0

    def add(self, uid: int, privileged: bool, change: int) -> None:
        count = self.per_uid.get(uid, 0) + change
        if count:
            self.per_uid[uid] = count
        else:
            del self.per_uid[uid]
        if privileged:
            self.privileged += change
        else:
            self.others += change


@attrs.frozen
class ConnectionLimits:
    """How many connections, and how idle, before a client is refused or closed.

    Root and the daemon's user have a pool of ``max_clients`` of their own, so no other user can
    keep them out; everyone else shares ``max_clients``, each uid at most ``per_uid`` of them."""

    max_clients: int = 1024
    per_uid: int = 64
    timeout: float = 60.0  # seconds to finish a line begun, or to send anything at all

    def refusal(self, count: ConnectionCount, uid: int, privileged: bool) -> str | None:
        """Why a new connection of ``uid`` is refused now, or None."""
        if privileged:
            if count.privileged >= self.max_clients:
                return f"Too many clients (limit {self.max_clients}); try again later."
            return None
        if count.per_uid.get(uid, 0) >= self.per_uid:
            return f"Too many connections from uid {uid} (limit {self.per_uid}); try again later."
        if count.others >= self.max_clients:
            return f"Too many clients (limit {self.max_clients}); try again later."
        return None

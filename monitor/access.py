"""Who may change leases: root, the daemon's own user, and members of one configured group.

Anyone who can connect may read (the socket's mode and group decide who can connect). The
peer's uid and gid come from the kernel (``SO_PEERCRED``), never from the request; group
membership is looked up per request, so removing a user from the group takes effect at once.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct

import attrs

DEFAULT_GROUP = "hotplug-monitor"


class UnknownGroup(Exception):
    pass


@attrs.frozen
class Peer:
    pid: int
    uid: int
    gid: int


def peer_of(sock: socket.socket) -> Peer:
    """The process at the other end of a Unix socket, as the kernel saw it connect."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid)


def resolve_group(name: str | None) -> int | None:
    """The gid of ``name``; with no name, that of ``hotplug-monitor`` if it exists, else None."""
    if name is None:
        try:
            return grp.getgrnam(DEFAULT_GROUP).gr_gid
        except KeyError:
            return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            return int(name)
        raise UnknownGroup(f"no group named {name!r} on this host") from None


class Access:
    def __init__(self, gid: int | None, own_uid: int | None = None) -> None:
        self.gid = gid
        self.own_uid = os.geteuid() if own_uid is None else own_uid

    def may_change(self, peer: Peer) -> bool:
        """Whether ``peer`` may reserve and release. Reads the user and group databases."""
        if peer.uid in (0, self.own_uid):
            return True
        if self.gid is None:
            return False
        if peer.gid == self.gid:
            return True
        try:
            name = pwd.getpwuid(peer.uid).pw_name
        except KeyError:
            return False  # no user entry: only its primary group can count
        return self.gid in os.getgrouplist(name, peer.gid)

"""Who is at the other end of a connection, as the kernel saw it connect.

The peer's uid, gid and groups come from the kernel (``SO_PEERCRED``, ``SO_PEERGROUPS``) as they
were when it connected, never from the request: the same groups the kernel used to let it open
the socket, with no user database lookup. What they allow is the core's decision
(``monitor.core.access``).
"""

from __future__ import annotations

import errno
import os
import socket
import struct

from monitor.core.access import Peer

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13; Python names it from 3.14 on
GID_SIZE = struct.calcsize("I")
MAX_GROUPS = 65536  # the kernel's NGROUPS_MAX
SELF_PID_NAMESPACE = "/proc/self/ns/pid"


def peer_of(sock: socket.socket) -> Peer:
    """The process at the other end of a Unix socket, as the kernel saw it connect."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid, _peer_groups(sock), in_our_pid_namespace(pid))


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


def in_our_pid_namespace(pid: int) -> bool:
    """Whether ``pid`` (as the kernel reported it to us) lives in the daemon's PID namespace, so
    that the PIDs it speaks of are ours. A peer the kernel could not map has PID 0."""
    if pid <= 0:
        return False
    try:
        return os.readlink(f"/proc/{pid}/ns/pid") == os.readlink(SELF_PID_NAMESPACE)
    except OSError:
        return False

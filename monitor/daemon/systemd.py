"""What systemd hands us and what we tell it: socket activation, sd_notify, the watchdog.

Notifications go through cysystemd (libsystemd's sd_notify). Socket activation is the documented
environment protocol (sd_listen_fds(3)): cysystemd does not wrap it, and it is a few lines.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

LISTEN_FDS_START = 3


class ActivationError(Exception):
    """systemd passed something we cannot serve on."""


def listen_socket() -> socket.socket | None:
    """The socket systemd passed us (first of ``LISTEN_FDS``), or None when not activated."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = int(os.environ.get("LISTEN_FDS", "0") or 0)
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for our children
    if count < 1:
        return None
    sock = socket.socket(fileno=LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ActivationError("the socket systemd passed is not a Unix stream socket")
    for extra in range(LISTEN_FDS_START + 1, LISTEN_FDS_START + count):
        os.close(extra)  # we serve on one socket; ignore the others rather than leak them
    return sock


def notify(**fields: str | int) -> None:
    """Tell systemd ``KEY=value``: READY=1, STATUS=..., WATCHDOG=1, STOPPING=1, RELOADING=1."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    from cysystemd.daemon import Notification
    from cysystemd.daemon import notify as sd_notify

    for key, value in fields.items():
        kind = Notification[key]
        try:
            if kind.value.constant is None:
                sd_notify(kind, value, return_exceptions=False)
            else:
                sd_notify(kind, return_exceptions=False)
        except (OSError, ValueError) as exc:  # a broken NOTIFY_SOCKET must not stop the daemon
            log.debug("sd_notify %s failed: %s", key, exc)


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec=), or None without a watchdog."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None

"""The socket file on disk: bound once at start, bound again if someone deletes it, removed at exit.

A tmpfiles cleaner or an operator's ``rm -r /run/hotplug-monitor`` removes the path while the
daemon still listens on the old inode, and no new client could reach it again. We look every
``CHECK_INTERVAL`` and, once the path is gone, listen on a new socket there; clients already
connected carry on. A path someone else has since taken is left alone.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 4096
# Seconds between looks at the path. Each look wakes an idle daemon; at 1 s that was 0.05 % of
# a core in the benchmark's idle scenario, against 0.000 % without, so: rarely.
CHECK_INTERVAL = 5.0

Listen = Callable[[socket.socket], Awaitable[None]]


class SocketInUse(Exception):
    """Another daemon answers on the socket path."""


def bind_unix_socket(path: Path, mode: int) -> socket.socket:
    """Listen on ``path``, replacing a stale socket file but never a live one."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        existing = path.lstat()
    except FileNotFoundError:
        existing = None
    if existing is not None:
        if not stat.S_ISSOCK(existing.st_mode):
            raise SocketInUse(f"{path} exists and is not a socket; remove it or choose --socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise
            log.info("replacing stale socket %s", path)
            path.unlink(missing_ok=True)
        else:
            raise SocketInUse(f"another hotplug-monitor is already serving on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, mode)
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


class SocketFile:
    """Our listening socket's path, with the inode we bound there."""

    def __init__(self, path: Path, gid: int | None) -> None:
        self.path = path
        self.gid = gid
        self.bound: os.stat_result | None = None

    def bind(self) -> socket.socket:
        """A new listening socket at the path: 0660 and our group's if we have one, else 0600."""
        sock = bind_unix_socket(self.path, 0o660 if self.gid is not None else 0o600)
        try:
            if self.gid is not None:
                os.chown(self.path, -1, self.gid)
            self.bound = os.stat(self.path)
        except OSError as exc:
            sock.close()
            raise PermissionError(f"cannot give {self.path} to group {self.gid}: {exc}") from None
        return sock

    def _current(self) -> os.stat_result | None:
        try:
            return os.stat(self.path)
        except OSError:
            return None

    def is_ours(self) -> bool:
        now = self._current()
        return (
            now is not None
            and self.bound is not None
            and (now.st_dev, now.st_ino) == (self.bound.st_dev, self.bound.st_ino)
        )

    def unlink_if_ours(self) -> None:
        if self.is_ours():
            self.path.unlink(missing_ok=True)

    async def keep(self, listen: Listen) -> None:
        """Bind the path again whenever it has vanished, handing each new socket to ``listen``."""
        failing = False
        while True:
            await trio.sleep(CHECK_INTERVAL)
            if self._current() is not None:
                continue  # ours, or someone else's: either way not ours to replace
            try:
                sock = self.bind()
            except (OSError, SocketInUse) as exc:
                if not failing:  # once per outage, not every second
                    log.error("%s was deleted and cannot be created again: %s", self.path, exc)
                failing = True
                continue
            failing = False
            log.warning("%s was deleted; listening there again", self.path)
            await listen(sock)

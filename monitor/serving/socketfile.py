"""The socket file on disk: bound once at start, bound again if someone deletes it, removed at exit.

A tmpfiles cleaner or an operator's ``rm -r /run/hotplug-monitor`` removes the path while the
daemon still listens on the old inode, and no new client could reach it again. We look every
``CHECK_INTERVAL`` and, once the path is gone, listen on a new socket there; clients already
connected carry on. A path someone else has since taken is left alone.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import socket
import stat
import struct
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from monitor.outputs.files import UnsafePath, secure_directory, unsafe_for

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 4096
# Seconds between looks at the path. Each look wakes an idle daemon, which otherwise stays
# asleep (tests/bench's idle scenario; the figures are in docs/performance.md), so: rarely.
CHECK_INTERVAL = 5.0

Listen = Callable[[socket.socket], Awaitable[None]]


class SocketInUse(Exception):
    """Another daemon answers on the socket path."""


class SocketPathError(Exception):
    """The socket cannot be made at that path; the message says why, in one line."""


MAX_PATH = 107  # sun_path holds 108 bytes, the terminating NUL among them

# A POSIX access ACL as the kernel stores it (linux/posix_acl_xattr.h): a version, then
# (tag, permissions, id) entries in tag order.
ACL_XATTR = "system.posix_acl_access"
_USER_OBJ, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x04, 0x08, 0x10, 0x20
_NO_ID = 0xFFFFFFFF


def read_group_acl(mode: int, read_gid: int) -> bytes:
    """The ACL of a socket of ``mode`` that also lets ``read_gid`` connect (connecting takes
    write permission): the mode's own entries, and one for the read-only group."""
    owner, group, other = (mode >> 6) & 7, (mode >> 3) & 7, mode & 7
    entries = [
        (_USER_OBJ, owner, _NO_ID),
        (_GROUP_OBJ, group, _NO_ID),
        (_GROUP, 6, read_gid),
        (_MASK, group | 6, _NO_ID),
        (_OTHER, other, _NO_ID),
    ]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def _set_acl(where: str, acl: bytes, path: Path) -> None:
    try:
        os.setxattr(where, ACL_XATTR, acl, follow_symlinks=False)
    except OSError as exc:
        raise SocketPathError(
            f"cannot let the read-only group connect to {path}: {exc.strerror or exc} (the "
            "socket's file system must support POSIX ACLs)"
        ) from None


class ReadGroupRefused(Exception):
    """The read-only group cannot be let in; the message says why."""


def let_read_group_in(sock: socket.socket, read_gid: int) -> None:
    """Give ``read_gid`` access to the socket systemd bound for us, at the path it is bound to.

    Through its name, so only where no one but root or us could have swapped that name: its
    directory must be ours and writable by nobody else, and the name a socket."""
    path = sock.getsockname()
    if not isinstance(path, str) or not path.startswith("/"):
        raise ReadGroupRefused("the socket systemd passed has no path")
    directory, name = os.path.split(path)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        held = os.fstat(fd)
        if held.st_uid not in (0, os.geteuid()) or held.st_mode & 0o022:
            raise ReadGroupRefused(f"{directory} is writable by others")
        bound = os.stat(name, dir_fd=fd, follow_symlinks=False)
        if not stat.S_ISSOCK(bound.st_mode):
            raise ReadGroupRefused(f"{path} is not a socket")
        acl = read_group_acl(stat.S_IMODE(bound.st_mode), read_gid)
        os.setxattr(f"/proc/self/fd/{fd}/{name}", ACL_XATTR, acl, follow_symlinks=False)
    except OSError as exc:
        raise ReadGroupRefused(f"cannot set an ACL on {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def _give_to_group(fd: int, gid: int, path: Path) -> None:
    try:
        os.chown("s", -1, gid, dir_fd=fd, follow_symlinks=False)
    except PermissionError:
        try:
            name = grp.getgrgid(gid).gr_name
        except KeyError:
            name = str(gid)
        raise SocketPathError(
            f"cannot listen on {path}: cannot give it to the group {name}, which uid "
            f"{os.geteuid()} is not in; give --group a group of yours, or run as root"
        ) from None


def _probe(path: Path) -> bool:
    """Whether a daemon answers on the socket at ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        raise
    finally:
        probe.close()
    return True


def bind_unix_socket(
    path: Path, mode: int, gid: int | None, read_gid: int | None = None
) -> tuple[socket.socket, os.stat_result]:
    """Listen on ``path`` with this mode and group (and an ACL that lets ``read_gid`` in too),
    replacing a stale socket but never a live one; the socket and the file's stat.

    The socket is bound in a private directory, given its mode and group there, and renamed into
    place: the name never exists with another mode, and no chmod or chown goes through a name
    that someone could have swapped for a symlink."""
    if len(os.fsencode(str(path))) > MAX_PATH:
        raise SocketPathError(
            f"{path} is longer than the {MAX_PATH} bytes a Unix socket path may have"
        )
    try:
        # A non-root daemon's socket is its user's alone: so is the directory it makes for it.
        create_mode = 0o755 if os.geteuid() == 0 else 0o700
        directory, created = secure_directory(path.parent, create_mode)
    except UnsafePath as exc:
        raise SocketPathError(str(unsafe_for("--socket", path, exc))) from None
    except OSError as exc:
        raise SocketPathError(
            f"cannot make the socket directory {path.parent}: {exc.strerror}"
        ) from None
    if created:
        log.info("created the socket directory %s", directory)
    final = directory / path.name
    try:
        existing = final.lstat()
    except FileNotFoundError:
        existing = None
    if existing is not None:
        if not stat.S_ISSOCK(existing.st_mode):
            raise SocketInUse(f"{path} exists and is not a socket; remove it or choose --socket")
        if _probe(final):
            raise SocketInUse(f"another hotplug-monitor is already serving on {path}")
        log.info("replacing stale socket %s", path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        private = tempfile.mkdtemp(prefix=".bind-", dir=directory)  # 0700, ours alone
        try:
            fd = os.open(private, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            parent = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                sock.bind(f"/proc/self/fd/{fd}/s")  # short whatever the directory's path
                os.chmod("s", mode, dir_fd=fd)
                if gid is not None:
                    _give_to_group(fd, gid, path)
                if read_gid is not None:
                    _set_acl(f"/proc/self/fd/{fd}/s", read_group_acl(mode, read_gid), path)
                bound = os.stat("s", dir_fd=fd)
                sock.listen(LISTEN_BACKLOG)  # before the name appears: no client is refused
                os.rename("s", path.name, src_dir_fd=fd, dst_dir_fd=parent)
            finally:
                os.close(fd)
                os.close(parent)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(private, "s"))
            os.rmdir(private)
    except OSError as exc:
        sock.close()
        raise SocketPathError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    except BaseException:
        sock.close()
        raise
    return sock, bound


class SocketFile:
    """Our listening socket's path, with the inode we bound there."""

    def __init__(self, path: Path, gid: int | None, read_gid: int | None = None) -> None:
        self.path = path
        self.gid = gid
        self.read_gid = read_gid
        self.bound: os.stat_result | None = None

    def bind(self) -> socket.socket:
        """A new listening socket at the path: 0660 and our group's if we have one, else 0600;
        the read-only group's members may connect too (an ACL entry)."""
        mode = 0o660 if self.gid is not None else 0o600
        sock, self.bound = bind_unix_socket(self.path, mode, self.gid, self.read_gid)
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
            except (SocketPathError, SocketInUse) as exc:
                if not failing:  # once per outage, not every second
                    log.error("%s was deleted and cannot be created again: %s", self.path, exc)
                failing = True
                continue
            failing = False
            log.warning("%s was deleted; listening there again", self.path)
            await listen(sock)

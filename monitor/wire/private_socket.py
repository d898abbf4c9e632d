"""A listening Unix socket that appears at its path with its final mode, whatever the umask.

A server library that binds the path itself (gRPC) makes the socket with the process's umask:
under umask 000 it is world-writable, and anyone may connect before a ``chmod`` narrows it (a
``chmod`` through the name could also follow a symlink swapped in). So the adapters bind in a
private directory (0700, made by ``mkdtemp``) beside the path, set the mode and group there,
and rename the socket into place, as the daemon does with its own socket.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

MAX_PATH = 107  # sun_path holds 108 bytes, the terminating NUL among them


@contextlib.contextmanager
def bound_privately(path: Path, mode: int = 0o600, gid: int | None = None) -> Iterator[str]:
    """Yields a temporary path to bind (and listen on) inside a private directory; once the
    block ends without error, the socket there gets ``mode`` (and ``gid``) and is renamed to
    ``path``, replacing a socket there but nothing else. OSError says why it cannot."""
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise FileExistsError(errno.EEXIST, "exists and is not a socket", str(path))
    private = tempfile.mkdtemp(prefix=".bind-", dir=path.parent)
    temporary = os.path.join(private, "s")
    try:
        if len(os.fsencode(temporary)) > MAX_PATH:
            raise OSError(errno.ENAMETOOLONG, "too long for a Unix socket path", temporary)
        yield temporary
        fd = os.open(private, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                if not stat.S_ISSOCK(os.stat("s", dir_fd=fd, follow_symlinks=False).st_mode):
                    raise OSError(errno.ENOTSOCK, "nothing listens there", temporary)
                os.chmod("s", mode, dir_fd=fd)
                if gid is not None:
                    os.chown("s", -1, gid, dir_fd=fd, follow_symlinks=False)
                os.rename("s", path.name, src_dir_fd=fd, dst_dir_fd=parent)
            finally:
                os.close(parent)
        finally:
            os.close(fd)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        os.rmdir(private)

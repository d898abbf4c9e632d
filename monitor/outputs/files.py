"""Files and directories the daemon writes in or reads back, on a host shared with other users.

The daemon runs as root. Whoever can write a directory it writes in can plant a symlink where a
temporary file will be created, or a file where one will be read back, and so turn root's writes
against any file on the host. So:

- a directory is used only if it is owned by root or the daemon's user and nobody else can write
  it, and every directory above it likewise (or sticky and root's, like ``/tmp``), as sshd's
  StrictModes demands of a home directory; its real path is used from then on, so a symlink
  changed later cannot redirect us;
- temporary files are created exclusively, never through a name that exists;
- a file read back must be a regular file, of bounded size, opened without blocking (a FIFO
  would hang us, ``/dev/zero`` would never end);
- a state directory has one daemon: an exclusive lock says which.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import tempfile
from pathlib import Path


class UnsafePath(Exception):
    """A path the daemon will not use; the message says which and why, in one line."""


def unsafe_for(setting: str, path: Path, error: UnsafePath) -> UnsafePath:
    """``error`` saying which setting named ``path``, and how to choose a safe one."""
    return UnsafePath(
        f"{setting} {path}: {error}; give {setting} a directory that only root "
        f"or uid {os.geteuid()} can write (a new one below it will do)"
    )


class InUse(Exception):
    """Another daemon holds the lock of a directory."""


def _trusted(uid: int) -> bool:
    return uid in (0, os.geteuid())


def _owner_problem(path: Path | str, st: os.stat_result) -> str | None:
    if not _trusted(st.st_uid):
        return f"{path} is owned by uid {st.st_uid}, not by root or uid {os.geteuid()}"
    if st.st_mode & 0o022:
        return f"others can write to {path} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _check_chain(real: Path, shown: Path) -> None:
    """``real`` (a resolved directory) and every directory above it are safe to write below."""
    st = os.stat(real)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f"{shown} is not a directory")
    problem = _owner_problem(real, st)
    if problem:
        raise UnsafePath(f"refusing {shown}: {problem}")
    for above in real.parents:
        st = os.stat(above)
        # In a sticky directory of root's, only its owner may rename or remove an entry.
        sticky_root = st.st_uid == 0 and st.st_mode & stat.S_ISVTX
        problem = _owner_problem(above, st)
        if problem and not sticky_root:
            raise UnsafePath(f"refusing {shown}: {problem}")


def secure_directory(path: Path, create_mode: int | None = None) -> tuple[Path, bool]:
    """The real path of a directory nobody but root and us can change, and whether we made it.

    A missing directory (and its missing parents) is made with ``create_mode`` when given, each
    below a directory already checked. ``UnsafePath`` when others could change it; ``OSError``
    when it cannot be looked at or made (missing, read-only, not a directory)."""
    path = Path(os.path.abspath(path))
    missing: list[str] = []
    existing = path
    while True:
        try:
            os.stat(existing)
            break
        except FileNotFoundError:
            if create_mode is None or existing == existing.parent:
                raise
            missing.append(existing.name)
            existing = existing.parent
    real = Path(os.path.realpath(existing))
    _check_chain(real, existing)
    for name in reversed(missing):
        real = real / name
        os.mkdir(real, 0o700)
        os.chmod(real, create_mode or 0o700)  # exactly, whatever the umask
    return real, bool(missing)


def read_regular_file(path: Path, limit: int, *, follow_symlinks: bool = True) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes, owned by root or us and writable
    by nobody else; ``UnsafePath`` otherwise. ``FileNotFoundError`` passes through."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePath(f"{path} is a symbolic link") from None
        raise UnsafePath(f"cannot read {path}: {exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # before fdopen, which a directory makes raise
        os.close(fd)
        raise UnsafePath(f"{path} is not a regular file")
    with os.fdopen(fd, "rb") as handle:
        problem = _owner_problem(path, st)
        if problem:
            raise UnsafePath(f"refusing {path}: {problem}")
        if st.st_size > limit:
            raise UnsafePath(f"{path} is larger than {limit} bytes")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise UnsafePath(f"{path} is larger than {limit} bytes")
    return data


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, mode: int = 0o600, durable: bool = True) -> None:
    """Replace ``path`` with ``data``: readers see the old bytes or the new, never a part; and
    ``durable``, after a crash too (``fsync`` of the file before the rename, of the directory
    after).

    The temporary file is created exclusively (``O_EXCL|O_NOFOLLOW``, a random name) in the same
    directory, which the caller has made sure nobody else can write."""
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(fd, mode)
            handle.write(data)
            handle.flush()
            if durable:
                os.fsync(fd)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    if durable:
        fsync_directory(path.parent)


def lock_directory(directory: Path) -> int:
    """Hold an exclusive lock on ``directory`` for as long as the returned fd is open.

    ``InUse`` naming the holder's PID when another process holds it. The lock is on the
    directory itself, so it needs no file in it and works on a read-only file system too."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(os.fstat(fd))
        os.close(fd)
        pid = f"pid {holder}" if holder else "another process"
        raise InUse(f"{directory} is in use by another hotplug-monitor ({pid})") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _lock_holder(st: os.stat_result) -> int | None:
    """The PID holding a flock on this inode, as /proc/locks lists it."""
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as locks:
            for line in locks:
                fields = line.split()
                # "1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF"
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == where:
                    return int(fields[4])
    except (OSError, ValueError):
        return None
    return None

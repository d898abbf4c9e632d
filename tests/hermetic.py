"""The suite runs beside the host's own daemon and leaves it alone: every test names its own
state, socket and CDI directories, a CLI run as another user does not see the system socket,
and the run fails if the paths a daemon on its defaults keeps changed during it."""

from __future__ import annotations

import ctypes
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from monitor.daemon.config import default_cdi_dir, default_state_dir
from monitor.wire.paths import SYSTEM_SOCKET

# The paths a daemon started on its defaults (as root) would use: the suite runs beside the
# host's own daemon, so every test names its own state, socket and CDI directories instead.
HOST_PATHS = tuple(
    dict.fromkeys(
        [
            default_state_dir(),
            SYSTEM_SOCKET.parent,
            Path("/run/cdi/hotplug-monitor.json"),
            *([d / "hotplug-monitor.json"] if (d := default_cdi_dir()) is not None else []),
        ]
    )
)


def host_fingerprint(paths: tuple[Path, ...] = HOST_PATHS) -> dict[str, Any]:
    """Every file below ``paths``: its type, size, mtime and, for a regular file, its contents'
    hash; a path that is not there is None."""
    found: dict[str, Any] = {}
    for top in paths:
        found[str(top)] = None
        walked = [top, *sorted(top.rglob("*"))] if top.is_dir() else [top]
        for path in walked:
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
            found[str(path)] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return found


@pytest.fixture(scope="session", autouse=True)
def host_daemon_paths_untouched() -> Iterator[None]:
    """The run fails if it changed what the host's daemon keeps (its leases, socket, CDI spec)."""
    before = host_fingerprint()
    yield
    after = host_fingerprint()
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    if changed:
        pytest.fail(
            "the suite changed the host daemon's paths (a test ran a daemon or CLI on the "
            f"defaults instead of its own directories): {', '.join(changed)}",
            pytrace=False,
        )


CLONE_NEWNS, MS_REC, MS_PRIVATE = 0x20000, 0x4000, 0x40000


def hide_system_socket() -> None:
    """In this (forked) process alone, an empty directory over the host daemon's socket
    directory: a CLI that falls back to the system socket finds no daemon there, as on a host
    without one, whether or not the host runs its own."""
    if not SYSTEM_SOCKET.parent.is_dir():
        return
    libc = ctypes.CDLL(None, use_errno=True)
    # a mount namespace of its own, private, so that the tmpfs is seen by no other process
    if (
        libc.unshare(CLONE_NEWNS) != 0
        or libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0
        or libc.mount(b"tmpfs", bytes(SYSTEM_SOCKET.parent), b"tmpfs", 0, b"mode=0755") != 0
    ):
        raise OSError(ctypes.get_errno(), f"cannot hide {SYSTEM_SOCKET.parent}")

"""Where the daemon's socket is, by default, for the daemon and for its clients."""

from __future__ import annotations

import os
import stat
from pathlib import Path

SYSTEM_SOCKET = Path("/run/hotplug-monitor/hotplug-monitor.sock")


def default_socket() -> Path:
    """Where ``serve`` listens by default: the system path for root, else the user's own."""
    if os.geteuid() == 0:
        return SYSTEM_SOCKET
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "hotplug-monitor.sock"
    return Path(f"/tmp/hotplug-monitor-{os.getuid()}/hotplug-monitor.sock")


def _private(directory: Path) -> bool:
    """Whether ``directory`` is the user's own and closed to everyone else (mode 0700)."""
    try:
        st = directory.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077


def client_socket() -> Path:
    """Where clients connect by default: the user's own daemon if one runs, else the system's.

    The fallback below /tmp is anyone's to create: it counts only when it is the user's own
    private directory, or another user could pose as the daemon there."""
    own = default_socket()
    trusted = os.geteuid() == 0 or os.environ.get("XDG_RUNTIME_DIR") or _private(own.parent)
    if trusted and (own.exists() or not SYSTEM_SOCKET.exists()):
        return own
    return SYSTEM_SOCKET

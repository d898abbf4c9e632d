"""Holder processes: a lease with one ends when that process ends, and only that process.

A PID alone is not a process: PIDs are reused. A holder is its PID, its start time in clock ticks
after boot (``/proc/PID/stat``) and the boot it started in: a reused PID has another start time, a
reboot another boot ID, and stepping the wall clock changes neither (a start time in epoch
seconds, as psutil gives it, moves with the clock). A pidfd turns readable when the process exits,
which wakes us at once without polling the host's process table.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import select
from collections.abc import Awaitable, Callable, Mapping

import trio

from monitor.core.leases import Holder, Lease

log = logging.getLogger(__name__)

BOOT_ID = "/proc/sys/kernel/random/boot_id"
RETRY_SECONDS = (1.0, 60.0)  # when the holder cannot be looked at (no fds left, say)


class HolderRefused(Exception):
    """A holder PID that cannot be one; the message says why, for the client."""


@functools.cache
def boot_id() -> str:
    with open(BOOT_ID) as handle:
        return handle.read().strip()


def _stat(pid: int) -> tuple[str, int] | None:
    """The state letter and start time (clock ticks after boot) of ``pid``, or None if no such
    process. The name in the file may hold spaces and parentheses: fields are counted from the
    last ``)``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[19])  # state is field 3, starttime field 22


def _thread_group(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def _exited(pidfd: int) -> bool:
    return bool(select.select([pidfd], [], [], 0)[0])


def identify(pid: int) -> Holder:
    """The process a client names as a holder; ``HolderRefused`` saying why it cannot be one."""
    tgid = _thread_group(pid)
    if tgid is None:
        raise HolderRefused(f"No process {pid} runs on this host.")
    if tgid != pid:
        raise HolderRefused(f"{pid} is a thread of process {tgid}, not a process.")
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise HolderRefused(f"No process {pid} runs on this host.") from None
    try:
        found = _stat(pid)
        if found is not None and found[0] in ("Z", "X"):
            raise HolderRefused(f"Process {pid} has exited (it is a zombie).")
        # The pidfd pins the PID: if it has not exited now, the stat we read was that process's.
        if found is None or _exited(pidfd):
            raise HolderRefused(f"Process {pid} has exited.")
        return Holder(pid, found[1], boot_id())
    finally:
        os.close(pidfd)


def open_holder(holder: Holder) -> int | None:
    """A pidfd for the holder if that very process still runs, else None (it has exited).

    Any error but "no such process" (no file descriptors left, say) is raised: it tells nothing
    of the holder, so its lease must not end for it."""
    if holder.boot_id != boot_id():
        return None
    try:
        pidfd = os.pidfd_open(holder.pid)
    except ProcessLookupError:
        return None
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # no longer a process of its own: a thread now
            return None
        raise
    found = _stat(holder.pid)
    if found is None or found[1] != holder.start_ticks or found[0] in ("Z", "X"):
        os.close(pidfd)
        return None
    return pidfd


def is_running(holder: Holder) -> bool:
    """Whether the holder still runs (``OSError`` when that cannot be told)."""
    pidfd = open_holder(holder)
    if pidfd is None:
        return False
    try:
        return not _exited(pidfd)
    finally:
        os.close(pidfd)


class HolderWatch:
    """One task per lease with a holder; ``ended(lease_id)`` is awaited when the holder exits."""

    def __init__(self, nursery: trio.Nursery, ended: Callable[[str], Awaitable[None]]) -> None:
        self._nursery = nursery
        self._ended = ended
        self._watching: dict[str, trio.CancelScope] = {}

    def update(self, leases: Mapping[str, Lease]) -> None:
        """Watch the holders of these leases, and stop watching those of leases now gone."""
        for lease_id in [i for i in self._watching if i not in leases]:
            self._watching.pop(lease_id).cancel()
        for lease in leases.values():
            if lease.holder is not None and lease.id not in self._watching:
                scope = trio.CancelScope()
                self._watching[lease.id] = scope
                self._nursery.start_soon(self._watch, lease.id, lease.holder, scope)

    async def _watch(self, lease_id: str, holder: Holder, scope: trio.CancelScope) -> None:
        with scope:
            delay = RETRY_SECONDS[0]
            while True:
                try:
                    pidfd = open_holder(holder)
                    break
                except OSError as exc:
                    log.error(
                        "cannot watch holder process %d of reservation %s (%s); trying again",
                        holder.pid,
                        lease_id,
                        exc.strerror,
                    )
                    await trio.sleep(delay)
                    delay = min(delay * 2, RETRY_SECONDS[1])
            if pidfd is not None:
                try:
                    await trio.lowlevel.wait_readable(pidfd)
                finally:
                    trio.lowlevel.notify_closing(pidfd)
                    os.close(pidfd)
            log.info("reservation %s ends: its holder process %d exited", lease_id, holder.pid)
            await self._ended(lease_id)


def from_legacy(pid: int, started: float) -> Holder | None:
    """The holder a version 1 lease file named by PID and start time in epoch seconds (boot time
    plus start ticks, as psutil computed it), if that process still runs."""
    found = _stat(pid)
    if found is None or found[0] in ("Z", "X"):
        return None
    with open("/proc/stat") as handle:
        booted = next(int(line.split()[1]) for line in handle if line.startswith("btime"))
    if abs(booted + found[1] / os.sysconf("SC_CLK_TCK") - started) >= 0.01:
        return None
    return Holder(pid, found[1], boot_id())

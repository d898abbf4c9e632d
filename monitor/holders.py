"""Holder processes: a lease with one ends when that process ends, and only that process.

A PID alone is not a process: PIDs are reused. A holder is its PID plus its start time (psutil),
checked after a pidfd is open, so the pidfd is known to refer to the very process the lease
names. The pidfd turns readable when that process exits, which wakes us at once without polling
the host's process table.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Awaitable, Callable, Mapping

import psutil
import trio

from monitor.leases import Lease

log = logging.getLogger(__name__)

START_TIME_TOLERANCE = 0.01  # psutil derives start times from clock ticks: equal within this


def start_time(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), or None if there is none."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, ValueError):  # gone, a zombie, or hidden from us
        return None


def is_same_process(pid: int, started: float) -> bool:
    now = start_time(pid)
    return now is not None and math.isclose(now, started, abs_tol=START_TIME_TOLERANCE)


def open_holder(pid: int, started: float) -> int | None:
    """A pidfd for the holder if it still runs, else None."""
    try:
        fd = os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        return None
    if not is_same_process(pid, started):
        os.close(fd)
        return None
    return fd


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
            if lease.holder_pid is not None and lease.id not in self._watching:
                scope = trio.CancelScope()
                self._watching[lease.id] = scope
                self._nursery.start_soon(self._watch, lease, scope)

    async def _watch(self, lease: Lease, scope: trio.CancelScope) -> None:
        assert lease.holder_pid is not None and lease.holder_start is not None
        with scope:
            fd = open_holder(lease.holder_pid, lease.holder_start)
            if fd is not None:
                try:
                    await trio.lowlevel.wait_readable(fd)
                finally:
                    trio.lowlevel.notify_closing(fd)
                    os.close(fd)
            reason = f"its holder process {lease.holder_pid} exited"
            log.info("reservation %s ends: %s", lease.id, reason)
            await self._ended(lease.id)

"""Giving memory back after a burst (a thousand subscribers come and go, a storm of uevents).

Python frees the objects of a burst, but its allocator keeps the pages: so once the daemon has
been quiet for ``QUIET_SECONDS`` after a change or a closed connection, and its RSS has grown by
more than ``GROWTH_BYTES`` since it last looked, it collects cycles and asks glibc to return
free pages (``malloc_trim``). It wakes only after activity: an idle daemon costs nothing here.

glibc can return pages only of memory it manages: under Python's own small-object allocator
(the default), the freed objects' 1 MiB arenas stay mapped while any object in them lives, so
the unit runs the daemon with ``PYTHONMALLOC=malloc`` (docs/performance.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
from collections.abc import AsyncIterator, Callable

import trio

log = logging.getLogger(__name__)

QUIET_SECONDS = 1.0
GROWTH_BYTES = 2 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * PAGE


def _malloc_trim() -> Callable[[], object]:
    """glibc's ``malloc_trim(0)``, or nothing where the C library has none (musl)."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is None:
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]
    return lambda: trim(0)


class GiveBack:
    """Collects and trims once the daemon has been quiet for ``QUIET_SECONDS`` after activity
    (a change published, a connection closed), if RSS grew since it last looked."""

    def __init__(
        self, rss: Callable[[], int] = resident_bytes, trim: Callable[[], object] | None = None
    ) -> None:
        self._rss = rss
        self._trim = trim or _malloc_trim()
        self._activity = trio.Event()

    def activity(self) -> None:
        self._activity.set()

    async def follow(self, changes: AsyncIterator[object]) -> None:
        async for _ in changes:
            self.activity()

    async def run(self) -> None:
        baseline = self._rss()
        while True:
            await self._activity.wait()
            while self._activity.is_set():  # quiet: a whole QUIET_SECONDS without activity
                self._activity = trio.Event()
                await trio.sleep(QUIET_SECONDS)
            before = self._rss()
            if before - baseline > GROWTH_BYTES:
                gc.collect()
                self._trim()
                baseline = self._rss()
                log.debug("gave back %d KiB after a burst", (before - baseline) // 1024)
            else:
                baseline = min(baseline, before)

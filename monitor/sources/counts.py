"""What the sources count for the ``status`` method, and the time each batch of uevents was read.

Plain numbers that the sources add to as they work (one trio thread, so no locks) and the
engine reads when asked: they change nothing the daemon decides.
"""

from __future__ import annotations

import attrs

from monitor.core.events import Event
from monitor.wire.stats import RESYNC_CAUSES


def _no_resyncs() -> dict[str, int]:
    return dict.fromkeys(RESYNC_CAUSES, 0)


@attrs.define
class SourceCounts:
    uevents: int = 0  # uevents read from netlink (pci and drm), whatever they meant
    resyncs: dict[str, int] = attrs.field(factory=_no_resyncs)  # sysfs read in full, by cause
    nvml_worker_restarts: int = 0  # NVML worker processes started again after one died
    kmsg_records: int = 0  # kernel log records read, whatever they said
    kmsg_ignored: int = 0  # of those, malformed, overlong or not text where the driver's should be
    kmsg_missed: int = 0  # records the kernel overwrote before we read them


@attrs.frozen
class Received:
    """Events from uevents, with the time (trio's clock) they were read: the reducer task
    measures from it how long they took to reach subscribers."""

    events: tuple[Event, ...]
    at: float

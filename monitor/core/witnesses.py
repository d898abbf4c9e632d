"""Two witnesses of one XID: NVML's events and the NVIDIA driver's kernel log lines.

The driver prints an XID to the kernel log and NVML delivers it as an event: the same fault, seen
twice. A report is the other witness's twin when a report of the same XID for the same GPU, from
another witness, came within ``TWIN_WINDOW`` seconds and has not been paired with one from this
witness yet: each report absorbs at most one twin per other witness, so a burst of real XIDs (XID
13 ten times a second) is still counted once per XID, not once per window. The line "GPU has
fallen off the bus", which names no XID, is a witness of its own (it comes with the driver's
"Xid 79" line, or alone): kmsg's XID 79 line, its fallen-off line and NVML's XID 79 count once.

Times are the sources' own reading times (trio's clock), passed in the events: the core has none.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from monitor.core.events import PciFacts, XidReported

# How far apart two witnesses' reports of one XID may be. NVML's event wait wakes within a
# second and the kernel log is read as it is written, so twins come well within this; two real
# faults of the same kind on one GPU this close are counted once per witness that saw them.
TWIN_WINDOW = 10.0
# Reports remembered at most: an XID storm beyond this within the window may count a twin again,
# but the state stays small whatever the host does.
MAX_SIGHTINGS = 256
SOURCES = ("nvml", "kmsg")


@attrs.frozen
class Sighting:
    """A counted report: which GPU, which XID, by whom, when, and which witnesses it paired."""

    address: str
    xid: int
    witness: str
    at: float
    paired: frozenset[str] = frozenset()


def witness(event: XidReported) -> str:
    """Who saw it: the source, and for a line that named no XID, that line of the source."""
    return f"{event.source}-inferred" if event.inferred else event.source


def gpu_at(devices: Mapping[str, PciFacts], address: str) -> str | None:
    """The device a report names. NVML names a PCI function (``0000:3b:00.0``); the driver's log
    lines name domain, bus and device (``0000:3b:00``): the function there bound to ``nvidia``,
    or function 0 when several are (a GPU is function 0; its audio or USB functions have drivers
    of their own), else none."""
    if address in devices:
        return address
    prefix = address + "."
    bound = [a for a, facts in devices.items() if a.startswith(prefix) and facts.driver == "nvidia"]
    if len(bound) == 1:
        return bound[0]
    return prefix + "0" if prefix + "0" in bound else None


def pair(
    sightings: tuple[Sighting, ...], event: XidReported, address: str
) -> tuple[tuple[Sighting, ...], bool]:
    """The sightings after ``event`` (for the device at ``address``), and whether it is the twin
    of one already counted. A report without a time is counted and not remembered."""
    kept = sightings
    at = event.at
    if at is None:
        return kept, False
    kept = tuple(s for s in kept if at - TWIN_WINDOW <= s.at <= at + TWIN_WINDOW)
    who = witness(event)
    for index, seen in enumerate(kept):
        same = (seen.address, seen.xid) == (address, event.xid)
        if same and who != seen.witness and who not in seen.paired:
            paired = attrs.evolve(seen, paired=seen.paired | {who})
            return (*kept[:index], paired, *kept[index + 1 :]), True
    new = Sighting(address, event.xid, who, at)
    return (*kept, new)[-MAX_SIGHTINGS:], False

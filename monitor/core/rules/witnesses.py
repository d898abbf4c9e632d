"""Which device a reported XID names, and whether another source reported it already.

Called first by ``monitor.core.rules.nvidia.xid_reported``; what the XID means is decided there.
"""

from __future__ import annotations

import attrs

from monitor.core.draft import Draft
from monitor.core.events import XidReported
from monitor.core.state import F
from monitor.core.witnesses import gpu_at, pair


def witnessed(draft: Draft, event: XidReported) -> XidReported | None:
    """``event`` naming its device by PCI address, if it is to be counted: None for a report of
    no GPU bound to ``nvidia``, and for the twin of a report another source made (counted once,
    under the source that came first)."""
    devices = draft.get(F.devices)
    address = gpu_at(devices, event.address)
    if address is None or devices[address].driver != "nvidia":
        return None
    sightings, twin = pair(draft.get(F.xid_sightings), event, address)
    draft.set(F.xid_sightings, sightings)
    if twin:
        return None
    instances = {i.uuid for layout in draft.get(F.mig).values() for i in layout.instances}
    for gone in [a for a in draft.get(F.xid_sources) if a not in devices and a not in instances]:
        draft.pop(F.xid_sources, gone)  # a device that left keeps no XID of its own either
    draft.put(F.xid_sources, address, event.source)
    return attrs.evolve(event, address=address)

"""Taking devices out of a lease, and saying so: shared by the leasing rules and the rules that
end leases on devices that are gone for good (a destroyed MIG instance)."""

from __future__ import annotations

import attrs

from monitor.core.draft import Draft
from monitor.core.leases import Lease, LeaseChange
from monitor.core.state import F


def take(
    draft: Draft,
    lease: Lease,
    devices: tuple[str, ...],
    kind: str,
    reason: str,
    by: int | None = None,
) -> None:
    """Take ``devices`` out of ``lease``; a lease left with none ends. ``by``: the uid that
    asked, if anyone did."""
    kept = {d: g for d, g in lease.devices.items() if d not in devices}
    if kept:
        draft.put(F.leases, lease.id, attrs.evolve(lease, devices=kept))
    else:
        draft.pop(F.leases, lease.id)
    draft.lease_changes.append(LeaseChange(kind, lease, devices, reason, by))

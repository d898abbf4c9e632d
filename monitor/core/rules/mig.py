"""MIG layouts as NVML shows them, and the driver's capability minors.

A GPU's layout (``MigLayoutSeen``) replaces the one before: new MIG devices appear, destroyed
ones leave, and MIG mode turned on or off shows as the GPU's devices changing (the fingerprint
shows a GPU with MIG devices as those alone, ``monitor.core.fingerprint``). A lease on a MIG
device that was destroyed ends at once, naming its holder (``monitor.core.transitions`` warns
them): unlike a GPU that left the host, a destroyed instance never comes back under its UUID.
A MIG UUID not in NVIDIA's present form (``MIG-`` and a UUID) names no device: the source says
so once per layout, and it is left out.

XIDs per instance are ``monitor.core.rules.mig_xids``'s.
"""

from __future__ import annotations

from monitor.core.draft import Draft, Rule
from monitor.core.events import MigLayoutSeen, MigMinorsRead
from monitor.core.mig import MigLayout, is_mig_uuid
from monitor.core.rules.leasing import take
from monitor.core.state import F


def mig_layout_seen(draft: Draft, event: MigLayoutSeen) -> None:
    address = event.address
    facts = draft.get(F.devices).get(address)
    if facts is None or facts.driver != "nvidia":
        return
    kept = tuple(i for i in event.layout.instances if is_mig_uuid(i.uuid))
    layout = MigLayout(event.layout.enabled, kept if event.layout.enabled else ())
    before = draft.get(F.mig).get(address)
    draft.put(F.mig, address, layout)
    gone = {i.uuid for i in before.instances} if before is not None else set()
    gone -= {i.uuid for i in layout.instances}
    if gone:
        forget_instances(draft, gone, f"the GPU at {address} was repartitioned")


def forget_instances(draft: Draft, uuids: set[str], why: str) -> None:
    """MIG devices destroyed: their XIDs and problems go, and the leases on them end."""
    for uuid in sorted(uuids):
        draft.pop(F.xids, uuid)
        draft.pop(F.xid_sources, uuid)
        draft.pop(F.problems, uuid)
    for lease in list(draft.get(F.leases).values()):
        ended = tuple(d for d in lease.devices if d in uuids)
        if ended:
            holder = f"uid {lease.uid}, pid {lease.holder_pid or lease.pid}"
            if lease.owner:
                holder = f"owner {lease.owner}, {holder}"
            reason = f"revoked, held by {holder}: its MIG instance was destroyed ({why})"
            take(draft, lease, ended, "ended", reason)


def mig_minors_read(draft: Draft, event: MigMinorsRead) -> None:
    draft.set(F.mig_minors, event.minors)


RULES: dict[type, Rule] = {MigLayoutSeen: mig_layout_seen, MigMinorsRead: mig_minors_read}

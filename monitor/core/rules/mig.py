"""MIG layouts as NVML shows them, and the driver's capability minors.

A GPU's layout (``MigLayoutSeen``) replaces the one before: new MIG devices appear, destroyed
ones leave, and MIG mode turned on or off shows as the GPU's devices changing (the fingerprint
shows a GPU with MIG devices as those alone, ``monitor.core.fingerprint``). A lease on a MIG
device that was destroyed ends at once, naming its holder (``monitor.core.transitions`` warns
them): unlike a GPU that left the host, a destroyed instance never comes back under its UUID.
A MIG UUID not in NVIDIA's present form (``MIG-`` and a UUID) names no device: the source says
so once per layout, and it is left out; so is one that another GPU's layout has already.

XIDs per instance are ``monitor.core.rules.mig_xids``'s.
"""

from __future__ import annotations

from monitor.core.draft import Draft, Rule
from monitor.core.events import MigLayoutSeen, MigMinorsRead
from monitor.core.mig import MigLayout, is_mig_uuid
from monitor.core.replicas import base_id
from monitor.core.rules.lease_changes import take
from monitor.core.state import F


def mig_layout_seen(draft: Draft, event: MigLayoutSeen) -> None:
    address = event.address
    facts = draft.get(F.devices).get(address)
    if facts is None or facts.driver != "nvidia":
        return
    # a UUID another GPU has already names that GPU's MIG device (NVML never gives one twice)
    taken = {
        i.uuid for a, other in draft.get(F.mig).items() if a != address for i in other.instances
    }
    kept = tuple(i for i in event.layout.instances if is_mig_uuid(i.uuid) and i.uuid not in taken)
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
        draft.pop(F.replicas, uuid)
    for lease in list(draft.get(F.leases).values()):
        ended = tuple(d for d in lease.devices if base_id(d) in uuids)  # and their replicas
        if ended:
            holder = f"uid {lease.uid}, pid {lease.holder_pid or lease.pid}"
            if lease.owner:
                holder = f"owner {lease.owner}, {holder}"
            reason = f"revoked, held by {holder}: its MIG instance was destroyed ({why})"
            take(draft, lease, ended, "ended", reason)


def forget_gpu(draft: Draft, address: str, why: str) -> None:
    """The GPU left the host or its driver: its MIG devices are destroyed with it (a MIG layout
    does not outlive the driver's hold on the GPU), and the leases on them end."""
    layout = draft.pop(F.mig, address)
    if layout is not None and layout.instances:
        forget_instances(draft, {i.uuid for i in layout.instances}, why)


def mig_minors_read(draft: Draft, event: MigMinorsRead) -> None:
    draft.set(F.mig_minors, event.minors)


RULES: dict[type, Rule] = {MigLayoutSeen: mig_layout_seen, MigMinorsRead: mig_minors_read}

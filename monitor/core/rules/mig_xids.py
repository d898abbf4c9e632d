"""XIDs per MIG instance: which XIDs are one instance's, and which the whole GPU's.

NVML attributes an XID to a GPU instance (and compute instance) where it can (its event data's
``gpuInstanceId``, 0xFFFFFFFF for none). Such an XID is the instance's alone when its verdict
leaves the GPU schedulable (NVIDIA's catalog says RESTART_APP or IGNORE: the application failed,
and it ran in that instance); a verdict that needs a reset or a reboot is the whole GPU's, and
so every instance's, since resetting the GPU takes all of them down. The verdict is the one
``monitor.core.xids.judge`` gives, the operator's ``--xid-ignore``/``--xid-fatal`` included.
"""

from __future__ import annotations

from monitor.core.draft import Draft
from monitor.core.events import XidReported
from monitor.core.state import F
from monitor.core.xids import Verdict


def instance_scoped(draft: Draft, event: XidReported, address: str, verdict: Verdict) -> list[str]:
    """The MIG devices an XID is theirs alone, by the rule above; none: the GPU's."""
    if event.gpu_instance is None or verdict.fatal:
        return []
    layout = draft.get(F.mig).get(address)
    if layout is None or not layout.enabled:
        return []
    return [
        i.uuid
        for i in layout.instances
        if i.gpu_instance_id == event.gpu_instance
        and event.compute_instance in (None, i.compute_instance_id)
    ]


def count_on_instances(draft: Draft, uuids: list[str], xid: int, source: str) -> None:
    for uuid in uuids:
        _, count = draft.get(F.xids).get(uuid, (0, 0))
        draft.put(F.xids, uuid, (xid, count + 1))
        draft.put(F.xid_sources, uuid, source)

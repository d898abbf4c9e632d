"""Inventory and health from the kernel: PCI functions and DRM nodes come, change and go.

Recovery needs evidence, and each piece clears the causes it speaks for: a removed device takes
its problems with it; a driver bound again clears a DRM wedge and every NVIDIA cause; a PCI
``SUCCESSFUL_RECOVERY`` clears PCI and XID errors.

A device's group name is fixed while it stays bound to one driver (``State.names``): the
hardware database's, except for an NVIDIA GPU bound to ``nvidia`` while NVML names GPUs, which
waits for NVML's name (``monitor.core.rules.nvidia``) and is not shown until then. A GPU that a
driver reload unbinds and binds again keeps NVML's name throughout (``_keeps_name``). NVML's facts
belong to a GPU bound to ``nvidia``: another binding drops them. A device with other IDs at the
same address is another device: nothing of the first stays with it.
"""

from __future__ import annotations

from monitor.core.draft import Draft, Rule
from monitor.core.events import (
    ClassFilterChanged,
    DeviceGone,
    DeviceSeen,
    DrmNodeGone,
    DrmNodeSeen,
    DrmWedged,
    PciErrorReported,
    PciFacts,
    Resync,
)
from monitor.core.health import (
    CAUSE_DRM_WEDGED,
    CAUSE_PCI_ERROR,
    CAUSE_RECOVERY_ACTION,
    CAUSE_XID,
    NVIDIA_CAUSES,
    Problem,
)
from monitor.core.pci import NVIDIA_VENDOR_ID
from monitor.core.rules.problems import clear_problems, set_problem
from monitor.core.state import F


def database_name(facts: PciFacts) -> str:
    """The hardware database's name for a device, else its IDs."""
    return facts.model or f"{facts.vendor_id:04x}:{facts.device_id:04x}"


def named_by_nvml(draft: Draft, facts: PciFacts) -> bool:
    return (
        draft.get(F.nvml_names)
        and facts.vendor_id == NVIDIA_VENDOR_ID
        and (facts.driver == "nvidia")
    )


def _identity(facts: PciFacts) -> tuple[int, ...]:
    return (facts.vendor_id, facts.device_id, facts.pci_class)


def device_seen(draft: Draft, event: DeviceSeen) -> None:
    facts = event.facts
    address = facts.address
    old = draft.get(F.devices).get(address)
    if old == facts:
        return
    if old is not None and _identity(old) != _identity(facts):
        # Another device at that address (its removal was lost): nothing of the old one is its.
        device_gone(draft, DeviceGone(address))
        old = None
    draft.put(F.devices, address, facts)
    if old is not None and old.driver == facts.driver:
        return  # the same binding: it keeps its name and facts
    if facts.driver != "nvidia":
        draft.pop(F.mig, address)
        draft.pop(F.nvml, address)
        draft.pop(F.xids, address)
        draft.pop(F.conditions, address)
    draft.pop(F.naming, address)
    if old is not None and _keeps_name(draft, old, facts):
        pass  # a driver unloaded and loaded again: the same GPU, shown throughout
    elif named_by_nvml(draft, facts):
        draft.pop(F.names, address)  # shown once NVML names it, or the wait is over
        wait = draft.get(F.waits) + 1
        draft.set(F.waits, wait)
        draft.put(F.naming, address, wait)
    else:
        draft.put(F.names, address, database_name(facts))
    if old is not None and facts.driver is not None:
        # NVML reads the health conditions afresh once it watches the rebound GPU
        draft.pop(F.conditions, address)
        clear_problems(draft, address, (CAUSE_DRM_WEDGED, *NVIDIA_CAUSES), "its driver was rebound")


def _keeps_name(draft: Draft, old: PciFacts, new: PciFacts) -> bool:
    """Whether a GPU unbound from ``nvidia``, or bound to it again, keeps the name NVML gave it.

    A driver reload unbinds every GPU and binds it again; hiding each while it waits for NVML's
    name once more would show the reload to subscribers as removals and adds. So a GPU unbound
    from ``nvidia`` keeps its name (and is unhealthy: no driver), and when it is bound to
    ``nvidia`` again it keeps a name other than the database's, which only NVML gives. A GPU
    that had the database's name (NVML was late, absent or could not watch it) waits for NVML's
    as on any other binding."""
    kept = draft.get(F.names).get(new.address)
    if kept is None or new.vendor_id != NVIDIA_VENDOR_ID:
        return False
    if old.driver == "nvidia" and new.driver is None:
        return True
    return old.driver is None and new.driver == "nvidia" and kept != database_name(new)


def device_gone(draft: Draft, event: DeviceGone) -> None:
    address = event.address
    if draft.pop(F.devices, address) is None:
        return
    draft.pop(F.problems, address)
    draft.pop(F.mig, address)  # leases on its MIG devices stay, shown departed, as its own
    draft.pop(F.nvml, address)
    draft.pop(F.xids, address)
    draft.pop(F.conditions, address)
    draft.pop(F.names, address)
    draft.pop(F.naming, address)
    draft.pop(F.resets, address)
    for name, node in list(draft.get(F.drm_nodes).items()):
        if node.parent == address:
            draft.pop(F.drm_nodes, name)


def drm_node_seen(draft: Draft, event: DrmNodeSeen) -> None:
    draft.put(F.drm_nodes, event.node.name, event.node)


def drm_node_gone(draft: Draft, event: DrmNodeGone) -> None:
    draft.pop(F.drm_nodes, event.name)


def pci_error_reported(draft: Draft, event: PciErrorReported) -> None:
    address, error_event, online = event.address, event.error_event, event.online
    if address not in draft.get(F.devices):
        return
    if error_event == "SUCCESSFUL_RECOVERY" or (error_event is None and online):
        if CAUSE_PCI_ERROR in draft.get(F.problems).get(address, {}):
            draft.put(F.resets, address, draft.get(F.resets).get(address, 0) + 1)
        causes = (CAUSE_PCI_ERROR, CAUSE_XID, CAUSE_RECOVERY_ACTION)
        reason = "the kernel reported a successful PCI error recovery"
        clear_problems(draft, address, causes, reason)
    elif error_event == "BEGIN_RECOVERY":
        desc = "PCI error: recovery in progress, device offline"
        set_problem(draft, address, CAUSE_PCI_ERROR, Problem(desc))
    elif error_event == "FAILED_RECOVERY":
        desc = "PCI error: recovery failed, device offline until it is reset or replaced"
        problem = Problem(desc, lost=True, recovery_action="reset or replace the device")
        set_problem(draft, address, CAUSE_PCI_ERROR, problem)
    elif error_event is not None:
        set_problem(draft, address, CAUSE_PCI_ERROR, Problem(f"PCI error event {error_event}"))
    elif online is False:
        set_problem(draft, address, CAUSE_PCI_ERROR, Problem("PCI device reported offline"))


def drm_wedged(draft: Draft, event: DrmWedged) -> None:
    name, method = event.name, event.method
    wedged = draft.get(F.drm_nodes).get(name)
    if wedged is None or wedged.parent not in draft.get(F.devices):
        return
    if method == "none":
        reason = f"the driver reports {name} working again"
        clear_problems(draft, wedged.parent, (CAUSE_DRM_WEDGED,), reason)
    else:
        desc = f"DRM device {name} is wedged; recovery needs: {method}"
        set_problem(draft, wedged.parent, CAUSE_DRM_WEDGED, Problem(desc, recovery_action=method))


def resync(draft: Draft, event: Resync) -> None:
    """The whole inventory again: what is gone goes, the rest is seen as if it came now.

    Facts only events can give (a PCI error, a wedge, NVML's) stay with devices that stayed."""
    present = {f.address for f in event.devices}
    for address in [a for a in draft.get(F.devices) if a not in present]:
        device_gone(draft, DeviceGone(address))
    for facts in event.devices:
        device_seen(draft, DeviceSeen(facts))
    nodes = {n.name: n for n in event.drm_nodes}
    for name in [n for n in draft.get(F.drm_nodes) if n not in nodes]:
        draft.pop(F.drm_nodes, name)
    for node in nodes.values():
        draft.put(F.drm_nodes, node.name, node)


def class_filter_changed(draft: Draft, event: ClassFilterChanged) -> None:
    draft.set(F.match_classes, event.match_classes)


RULES: dict[type, Rule] = {
    DeviceSeen: device_seen,
    DeviceGone: device_gone,
    DrmNodeSeen: drm_node_seen,
    DrmNodeGone: drm_node_gone,
    PciErrorReported: pci_error_reported,
    DrmWedged: drm_wedged,
    Resync: resync,
    ClassFilterChanged: class_filter_changed,
}

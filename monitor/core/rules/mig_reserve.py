"""What a reservation may be, for GPUs in MIG mode and their MIG devices (DESIGN 3b).

A GPU with MIG devices is shown as them alone, so its PCI address or UUID names no device shown:
``mig_whole`` says why, naming its MIG devices. A GPU in MIG mode with no MIG device is shown
whole but not leased: a container given it could run nothing on it. A MIG device whose
capability nodes are not known (the mig-minors file is missing or lacks its entries) is not
leased either: a container given it without them could not open it.
"""

from __future__ import annotations

from collections.abc import Iterable

from monitor.core.answers import Reason, Refusal
from monitor.core.mig import MIG_TYPE, MigLayout
from monitor.core.model import Device, DeviceGroup
from monitor.core.state import State


def mig_whole(state: State, device_id: str) -> tuple[str, list[str]] | None:
    """When ``device_id`` (a PCI address or GPU UUID) names a GPU shown as its MIG devices:
    why it is not leased whole, and its MIG devices."""
    address = device_id.lower()
    if address not in state.mig:
        address = next((a for a, g in state.nvml.items() if g.uuid == device_id), address)
    instances = [i.uuid for i in state.mig_instances(address)]
    if not instances:
        return None
    why = (
        f"{device_id} is in MIG mode with MIG instances and is not reserved whole: reserve one "
        f"of its MIG instances: {', '.join(instances)}"
    )
    return why, instances


def mig_blocked(state: State, device_id: str) -> str | None:
    """Why a MIG device of this host is not shown, when its GPU is held whole."""
    found = state.mig_instance(device_id)
    if found is None:
        return None
    address = found[0]
    holders = sorted(i for i, lease in state.leases.items() if address in lease.devices)
    if not holders:
        return None
    return (
        f"{device_id} is a MIG instance of {address}, which is reserved whole "
        f"({', '.join(holders)}): its MIG instances are shown once that reservation ends"
    )


def _empty(layout: MigLayout, device: Device) -> bool:
    """MIG mode on, no MIG device, and not held whole already (by an owner re-reserving it)."""
    return layout.enabled and not layout.instances and device.reserved_by is None


def mig_refusal(state: State, found: Iterable[tuple[DeviceGroup, Device]]) -> Refusal | None:
    """Why these devices are not leased, where MIG is the reason: a GPU in MIG mode with no MIG
    device, or a MIG device without its capability nodes."""
    empty, no_caps = [], []
    for group, device in found:
        if group.type == MIG_TYPE:
            if "mig_caps" not in device.attributes:
                no_caps.append(device.id)
        elif (layout := state.mig.get(device.id)) is not None and _empty(layout, device):
            empty.append(device.id)
    if empty:
        return Refusal(
            Reason.INVALID,
            f"{', '.join(empty)} is in MIG mode with no MIG instance: a container given the "
            "whole GPU could run nothing on it. Create MIG instances (nvidia-smi mig -cgi ... "
            "-C) or turn MIG mode off.",
            {"device_ids": empty},
        )
    if no_caps:
        why = state.mig_minors.problem or "it has no entry for their GPU and compute instances"
        return Refusal(
            Reason.INVALID,
            f"The capability nodes of {', '.join(no_caps)} are not known, and a container "
            f"cannot open a MIG instance without them: the mig-minors file: {why}.",
            {"device_ids": no_caps},
        )
    return None

"""What the journal records of a fold: devices that came or went, health that changed, reserved
devices that broke, and leases granted, released or ended.

Derived from the state before a fold and the fold's outcome; nothing here decides anything.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from monitor.core.health import device_problems
from monitor.core.leases import Lease, LeaseChange
from monitor.core.mig import MIG_TYPE
from monitor.core.model import Device, DeviceGroup
from monitor.core.reducer import Reduction
from monitor.core.replicas import base_id
from monitor.core.state import State
from monitor.core.xid_catalog import RESTART_APP
from monitor.core.xids import xid_action, xid_name


@attrs.frozen
class HealthTransition:
    """A device that turned unhealthy, changed why, or recovered."""

    kind: str  # "unhealthy", "lost" or "recovered"
    device_id: str
    vendor: str
    device_name: str
    health_desc: str  # now; for a recovery, what it was
    recovery_action: str | None = None
    reason: str | None = None  # for a recovery: the evidence
    uuid: str | None = None  # an NVIDIA GPU's
    xid: int | None = None
    xid_source: str | None = None  # who reported the XID: "nvml" or "kmsg"
    conditions: tuple[str, ...] = ()  # the health conditions NVML reports for it now
    # The leases on it or, shared, on its replicas, when it turned unhealthy: so that an alert
    # for a shared GPU names everyone whose work it stops.
    holders: tuple[str, ...] = ()


@attrs.frozen
class DeviceMoved:
    """A device shown for the first time, or no longer shown (it left the host or the filter)."""

    kind: str  # "added" or "removed"
    device_id: str
    vendor: str
    device_name: str
    uuid: str | None = None


@attrs.frozen
class LeaseWarning:
    """A reserved device that left the host or turned unhealthy: its holder must hear of it."""

    lease: Lease
    device_id: str
    health_desc: str


@attrs.frozen
class WorkFailed:
    """An XID by which NVIDIA's catalog says the application failed and the GPU is fine
    (RESTART_APP): the GPU stays schedulable, and the holder whose work it ended must hear of
    it."""

    lease: Lease
    device_id: str
    xid: int
    desc: str  # the XID as the catalog names it


Entry = HealthTransition | DeviceMoved | LeaseWarning | WorkFailed | LeaseChange


def journal_entries(old: State, reduction: Reduction) -> list[Entry]:
    """Everything worth a journal entry in one fold, in the order it is best read."""
    new = reduction.state
    entries: list[Entry] = []
    if new.fingerprint is not old.fingerprint:
        entries += device_moves(old, new)
        entries += health_transitions(old, new, reduction.recoveries)
        entries += lease_warnings(old, new)
    if new.xids is not old.xids:
        entries += work_failed(old, new)
    entries += reduction.lease_changes
    return entries


def _shown_present(state: State) -> dict[str, tuple[DeviceGroup, Device]]:
    """Devices shown and on the host (not only kept for a lease), by PCI address: a shared
    device once, as its first replica, since its replicas come, go and break with it. A MIG
    device is one of its own, by its MIG UUID: each is created and destroyed alone."""
    shown: dict[str, tuple[DeviceGroup, Device]] = {}
    for device_id, found in state.fingerprint.devices().items():  # a group's sorted: ::0 first
        group, device = found
        if device.hw_locality.pci_bus_id in state.devices:
            key = device_id if group.type == MIG_TYPE else base_id(device_id)
            shown.setdefault(key, found)
    return shown


def device_moves(old: State, new: State) -> list[DeviceMoved]:
    """Healthy devices shown now and not before, and every device shown before and not now
    (an unhealthy arrival is a health transition of its own)."""
    before = {a: (g.vendor, g.name) for a, (g, _) in _shown_present(old).items()}
    devices = _shown_present(new)
    after = {a: (g.vendor, g.name) for a, (g, _) in devices.items()}
    moves = []
    for device_id, (vendor, name) in after.items():
        if device_id not in before and devices[device_id][1].healthy:
            moves.append(DeviceMoved("added", device_id, vendor, name, _uuid(new, device_id)))
    for device_id, (vendor, name) in before.items():
        # a GPU rebound to nvidia is hidden while it waits for NVML's name: not gone
        if device_id not in after and device_id not in new.naming:
            moves.append(DeviceMoved("removed", device_id, vendor, name, _uuid(old, device_id)))
    return moves


def _uuid(state: State, device_id: str) -> str | None:
    gpu = state.nvml.get(device_id)
    return gpu.uuid or None if gpu else None


def health_transitions(
    old: State, new: State, recoveries: Mapping[str, str] | None = None
) -> list[HealthTransition]:
    """Devices whose health changed between two states, and devices that arrived unhealthy."""
    shown_before = old.fingerprint.devices()
    before = {a: d for a, (_, d) in _shown_present(old).items()}
    transitions = []
    for device_id, evidence in (recoveries or {}).items():
        # recovered while hidden, waiting for NVML's name (a rebind): its recovery is news too
        if device_id in new.naming and device_id in shown_before:
            was_in, was = shown_before[device_id]
            if not was.healthy and not device_problems(
                new.devices[device_id], new.problems.get(device_id, {})
            ):
                transitions.append(
                    HealthTransition(
                        "recovered",
                        device_id,
                        was_in.vendor,
                        was_in.name,
                        was.health_desc,
                        None,
                        evidence,
                        _uuid(old, device_id),
                    )
                )
    # departed devices, shown only while reserved, are lease_warnings' to report
    for address, (group, device) in _shown_present(new).items():
        previous = before.get(address)
        if previous is None and device.healthy:
            continue
        if previous is not None and (previous.healthy, previous.health_desc) == (
            device.healthy,
            device.health_desc,
        ):
            continue
        uuid = _uuid(new, address)
        parent = device.hw_locality.pci_bus_id  # a MIG device's GPU; else the device itself
        if device.healthy:
            assert previous is not None
            reason = (recoveries or {}).get(address) or (recoveries or {}).get(parent)
            transition = HealthTransition(
                "recovered", address, group.vendor, group.name, previous.health_desc, None, reason
            )
        else:
            problems = device_problems(new.devices[parent], new.problems.get(parent, {}))
            if parent != address:  # a MIG device's own
                problems += list(new.problems.get(address, {}).values())
            kind = "lost" if any(p.lost for p in problems) else "unhealthy"
            actions = [p.recovery_action for p in problems if p.recovery_action]
            xids = [p.xid for p in problems if p.xid is not None]
            transition = HealthTransition(
                kind,
                address,
                group.vendor,
                group.name,
                device.health_desc,
                actions[0] if actions else None,
                xid=xids[0] if xids else None,
                xid_source=new.xid_sources.get(parent) if xids else None,
            )
        transition = attrs.evolve(
            transition,
            uuid=uuid,
            conditions=tuple(new.conditions.get(parent, {})),
            holders=() if device.healthy else lease_holders(new, address),
        )
        transitions.append(transition)
    return transitions


def lease_holders(state: State, device_id: str) -> tuple[str, ...]:
    """Who holds the device or, shared, its replicas, for an alert that it broke: so that an
    operator knows which jobs ran on it (each lease also gets a warning, ``lease_warnings``)."""
    held = []
    for lease in state.leases.values():
        if any(base_id(d) == device_id for d in lease.devices):
            owner = f"owner {lease.owner}, " if lease.owner else ""
            held.append(f"reservation {lease.id} ({owner}uid {lease.uid}, pid {lease.pid})")
    return tuple(sorted(held))


def lease_warnings(old: State, new: State) -> list[LeaseWarning]:
    """Reserved devices whose health got worse or changed between two states."""
    before = old.fingerprint.devices()
    after = new.fingerprint.devices()
    warnings = []
    for lease in new.leases.values():
        for device_id in lease.devices:
            device = after[device_id][1] if device_id in after else None
            if device is None or device.healthy:
                continue
            previous = before[device_id][1] if device_id in before else None
            if previous is None or previous.health_desc != device.health_desc:
                warnings.append(LeaseWarning(lease, device_id, device.health_desc))
    return warnings


def work_failed(old: State, new: State) -> list[WorkFailed]:
    """Leased GPUs that counted a RESTART_APP XID and stayed healthy (an XID that made a GPU
    unhealthy is a lease warning already)."""
    shown = new.fingerprint.devices()
    failed = []
    for lease in new.leases.values():
        for device_id in lease.devices:
            xids = new.xids.get(device_id)
            if xids is None or xids == old.xids.get(device_id):
                continue
            device = shown[device_id][1] if device_id in shown else None
            if device is not None and device.healthy and xid_action(xids[0]) == RESTART_APP:
                failed.append(WorkFailed(lease, device_id, xids[0], xid_name(xids[0])))
    return failed

"""The one place that decides what an event means.

``reduce(state, event) -> (state, patch)`` is pure and synchronous: no I/O, no trio, no clock. The
state keeps the raw facts (every PCI function, every DRM node, the health problems reported per
device) and the fingerprint derived from them; the patch is the RFC 7386 merge patch that turns the
old fingerprint's JSON into the new one, or ``None`` when nothing a client can see changed. The
generation grows only with a patch.

Health is a set of problems per device, keyed by cause, so that evidence of recovery for one cause
(a PCI ``SUCCESSFUL_RECOVERY``) does not clear another (a wedged DRM device). A device is healthy
when it has a driver bound and no problem. A device that is removed takes its problems with it; a
device whose driver is rebound loses its wedge (rebinding is how a wedge is recovered).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import json_merge_patch

from monitor.events import (
    ClassFilterChanged,
    ConnectionClosed,
    DeviceGone,
    DeviceSeen,
    DrmNode,
    DrmNodeGone,
    DrmNodeSeen,
    DrmWedged,
    Event,
    LeaseEnded,
    PciErrorReported,
    PciFacts,
    ReleaseRequested,
    ReserveRequested,
    Resync,
)
from monitor.leases import Lease
from monitor.model import (
    Attribute,
    Device,
    DeviceGroup,
    DeviceLocality,
    Fingerprint,
    common_attributes,
    frozen_mapping,
    group_key,
)
from monitor.protocol import DEVICE_RESERVED, INVALID_PARAMS, PERMISSION_DENIED, RpcError
from monitor.reservations import check_healthy, device_index, resolve

# PCI base classes: 0x03 display controllers, 0x12 processing accelerators.
DEFAULT_MATCH_CLASSES = ("03", "12")

VENDOR_NAMES = {0x10DE: "nvidia", 0x1002: "amd", 0x1022: "amd", 0x8086: "intel"}
TYPE_BY_BASE_CLASS = {0x03: "gpu", 0x12: "accelerator"}

# Causes of ill health, in the order health_desc names them.
CAUSE_PCI_ERROR = "pci_error"
CAUSE_DRM_WEDGED = "drm_wedged"


@attrs.frozen
class Problem:
    """One reason a device is unhealthy."""

    desc: str
    lost: bool = False  # the device is gone until reset or replaced (journal priority crit)
    recovery_action: str | None = None  # what an operator or driver must do, where known


Problems = Mapping[str, Problem]  # cause -> problem


def _frozen_problems(items: Mapping[str, Mapping[str, Problem]]) -> Mapping[str, Problems]:
    return frozen_mapping({k: frozen_mapping(v) for k, v in items.items() if v})


@attrs.frozen
class HealthTransition:
    """A device that turned unhealthy, changed why, or recovered: what the journal records."""

    kind: str  # "unhealthy", "lost" or "recovered"
    device_id: str
    vendor: str
    device_name: str
    health_desc: str  # now; for a recovery, what it was
    recovery_action: str | None = None


@attrs.frozen
class State:
    generation: int = 0
    match_classes: tuple[str, ...] = DEFAULT_MATCH_CLASSES
    devices: Mapping[str, PciFacts] = attrs.field(converter=frozen_mapping, factory=dict)
    drm_nodes: Mapping[str, DrmNode] = attrs.field(converter=frozen_mapping, factory=dict)
    problems: Mapping[str, Problems] = attrs.field(converter=_frozen_problems, factory=dict)
    leases: Mapping[str, Lease] = attrs.field(converter=frozen_mapping, factory=dict)
    fingerprint: Fingerprint = attrs.field(factory=Fingerprint)


Patch = dict[str, Any]
Answer = Lease | list[str] | RpcError  # a granted lease, the devices released, or a refusal


@attrs.frozen
class Reduction:
    state: State
    patch: Patch | None
    # per request: ReserveRequested by its lease ID, ReleaseRequested by its token
    answers: Mapping[str | int, Answer] = attrs.field(factory=dict)


def reduce(state: State, event: Event) -> tuple[State, Patch | None]:
    """Fold one event into the state."""
    return reduce_all(state, (event,))


def reduce_all(state: State, events: Iterable[Event]) -> tuple[State, Patch | None]:
    """Fold a batch of events into the state, with one patch (and generation) for all of them."""
    reduction = fold(state, events)
    return reduction.state, reduction.patch


def fold(state: State, events: Iterable[Event]) -> Reduction:
    """Fold a batch of events, requests among them, into one state and one patch.

    Each request is decided against the devices and leases as the events before it left them,
    so requests in one batch are decided one after the other, as if they came one by one.
    """
    scratch = _Scratch(state)
    for event in events:
        scratch.apply(event)
    if not scratch.changed:
        return Reduction(state, None, scratch.answers)
    fingerprint = scratch.fingerprint()
    patch = fingerprint_patch(state.fingerprint, fingerprint)
    new = State(
        generation=state.generation + (patch is not None),
        match_classes=scratch.match_classes,
        devices=scratch.devices,
        drm_nodes=scratch.drm_nodes,
        problems=scratch.problems,
        leases=scratch.leases,
        fingerprint=fingerprint,
    )
    return Reduction(new, patch, scratch.answers)


class _Scratch:
    """Mutable working copies of one state's facts, private to one ``fold`` call."""

    def __init__(self, state: State) -> None:
        self.match_classes = state.match_classes
        self.devices = dict(state.devices)
        self.drm_nodes = dict(state.drm_nodes)
        self.problems = {k: dict(v) for k, v in state.problems.items()}
        self.leases = dict(state.leases)
        self.answers: dict[str | int, Answer] = {}
        self._changed = False
        self._built: Fingerprint | None = state.fingerprint

    @property
    def changed(self) -> bool:
        return self._changed

    @changed.setter
    def changed(self, value: bool) -> None:
        self._changed = value
        self._built = None

    def fingerprint(self) -> Fingerprint:
        """The fingerprint of the facts as they are now, built at most once per change."""
        if self._built is None:
            self._built = build_fingerprint(
                self.devices, self.drm_nodes, self.problems, self.match_classes, self.leases
            )
        return self._built

    def apply(self, event: Event) -> None:
        match event:
            case DeviceSeen(facts):
                self._seen(facts)
            case DeviceGone(address):
                self._gone(address)
            case DrmNodeSeen(node):
                if self.drm_nodes.get(node.name) != node:
                    self.drm_nodes[node.name] = node
                    self.changed = True
            case DrmNodeGone(name):
                if self.drm_nodes.pop(name, None) is not None:
                    self.changed = True
            case PciErrorReported(address, error_event, online):
                if address in self.devices:
                    self._pci_error(address, error_event, online)
            case DrmWedged(name, method):
                wedged = self.drm_nodes.get(name)
                if wedged is not None and wedged.parent in self.devices:
                    if method == "none":
                        self._clear(wedged.parent, CAUSE_DRM_WEDGED)
                    else:
                        desc = f"DRM device {name} is wedged; recovery needs: {method}"
                        problem = Problem(desc, recovery_action=method)
                        self._set(wedged.parent, CAUSE_DRM_WEDGED, problem)
            case Resync(devices, drm_nodes):
                present = {f.address for f in devices}
                for address in [a for a in self.devices if a not in present]:
                    self._gone(address)
                for facts in devices:
                    self._seen(facts)
                nodes = {n.name: n for n in drm_nodes}
                if nodes != self.drm_nodes:
                    self.drm_nodes = nodes
                    self.changed = True
            case ClassFilterChanged(match_classes):
                if match_classes != self.match_classes:
                    self.match_classes = match_classes
                    self.changed = True
            case ReserveRequested(device_ids, lease):
                try:
                    self.answers[lease.id] = self._reserve(device_ids, lease)
                except RpcError as refusal:
                    self.answers[lease.id] = refusal
            case ReleaseRequested(token, uid, lease_id, device_ids):
                try:
                    self.answers[token] = self._release(uid, lease_id, device_ids)
                except RpcError as refusal:
                    self.answers[token] = refusal
            case LeaseEnded(lease_id):
                if self.leases.pop(lease_id, None) is not None:
                    self.changed = True
            case ConnectionClosed(connection):
                for lease in [le for le in self.leases.values() if le.connection == connection]:
                    del self.leases[lease.id]
                    self.changed = True

    def _reserve(self, device_ids: tuple[str, ...], lease: Lease) -> Lease:
        """All the devices or none: each known, healthy and held by no other lease."""
        wanted = resolve(self.fingerprint(), device_ids)
        check_healthy(wanted)
        holders = {d.id: d.reserved_by for _, d in wanted if d.reserved_by is not None}
        if holders:
            held = {
                device_id: self.leases[lease_id].holder_json()
                for device_id, lease_id in holders.items()
            }
            raise RpcError(
                DEVICE_RESERVED,
                "Already reserved: "
                + "; ".join(f"{d} by {lease_id}" for d, lease_id in holders.items())
                + ".",
                {"device_ids": list(holders), "holders": held},
            )
        granted = attrs.evolve(lease, devices={d.id: g.key for g, d in wanted})
        self.leases[granted.id] = granted
        self.changed = True
        return granted

    def _release(self, uid: int, lease_id: str | None, device_ids: tuple[str, ...]) -> list[str]:
        """Release a lease, or devices from their leases; only the lease's uid or root may."""
        if lease_id is not None:
            lease = self.leases.get(lease_id)
            if lease is None:
                raise RpcError(
                    INVALID_PARAMS,
                    f"No reservation {lease_id} is held.",
                    {"reservation_id": lease_id},
                )
            affected = {lease.id: set(lease.devices)}
        else:
            index = device_index(self.fingerprint())
            wanted = {index[i][1].id if i in index else i.lower() for i in device_ids}
            affected = {
                held.id: wanted & set(held.devices)
                for held in self.leases.values()
                if wanted & set(held.devices)
            }
        refused = [i for i in affected if uid not in (0, self.leases[i].uid)]
        if refused:
            raise RpcError(
                PERMISSION_DENIED,
                "Only the user who made a reservation, or root, may release it: "
                + ", ".join(refused)
                + ".",
                {"reservation_ids": refused},
            )
        released: list[str] = []
        for held_id, devices in affected.items():
            lease = self.leases[held_id]
            released.extend(d for d in lease.devices if d in devices)
            kept = {d: g for d, g in lease.devices.items() if d not in devices}
            if kept:
                self.leases[held_id] = attrs.evolve(lease, devices=kept)
            else:
                del self.leases[held_id]
            self.changed = True
        return released

    def _seen(self, facts: PciFacts) -> None:
        old = self.devices.get(facts.address)
        if old == facts:
            return
        self.devices[facts.address] = facts
        self.changed = True
        if old is not None and old.driver != facts.driver:
            self._clear(facts.address, CAUSE_DRM_WEDGED)

    def _gone(self, address: str) -> None:
        if self.devices.pop(address, None) is None:
            return
        self.changed = True
        self.problems.pop(address, None)
        for name in [n for n, node in self.drm_nodes.items() if node.parent == address]:
            del self.drm_nodes[name]

    def _pci_error(self, address: str, error_event: str | None, online: bool | None) -> None:
        if error_event == "SUCCESSFUL_RECOVERY" or (error_event is None and online):
            self._clear(address, CAUSE_PCI_ERROR)
        elif error_event == "BEGIN_RECOVERY":
            desc = "PCI error: recovery in progress, device offline"
            self._set(address, CAUSE_PCI_ERROR, Problem(desc))
        elif error_event == "FAILED_RECOVERY":
            desc = "PCI error: recovery failed, device offline until it is reset or replaced"
            problem = Problem(desc, lost=True, recovery_action="reset or replace the device")
            self._set(address, CAUSE_PCI_ERROR, problem)
        elif error_event is not None:
            self._set(address, CAUSE_PCI_ERROR, Problem(f"PCI error event {error_event}"))
        elif online is False:
            self._set(address, CAUSE_PCI_ERROR, Problem("PCI device reported offline"))

    def _set(self, address: str, cause: str, problem: Problem) -> None:
        causes = self.problems.setdefault(address, {})
        if causes.get(cause) != problem:
            causes[cause] = problem
            self.changed = True

    def _clear(self, address: str, cause: str) -> None:
        causes = self.problems.get(address)
        if causes and causes.pop(cause, None) is not None:
            self.changed = True


def class_matches(pci_class: int, match_classes: Iterable[str]) -> bool:
    """Whether a 24-bit class code starts with one of the hex prefixes (``03``, ``0302``)."""
    code = f"{pci_class:06x}"
    return any(code.startswith(prefix) for prefix in match_classes)


def vendor_name(vendor_id: int) -> str:
    return VENDOR_NAMES.get(vendor_id, f"{vendor_id:04x}")


def device_type(pci_class: int) -> str:
    return TYPE_BY_BASE_CLASS.get(pci_class >> 16, "pci")


def device_name(facts: PciFacts) -> str:
    return facts.model or f"{facts.vendor_id:04x}:{facts.device_id:04x}"


def device_attributes(facts: PciFacts, nodes: list[DrmNode]) -> dict[str, Attribute]:
    attributes = {
        "vendor_id": Attribute(f"0x{facts.vendor_id:04x}"),
        "device_id": Attribute(f"0x{facts.device_id:04x}"),
        "pci_class": Attribute(f"0x{facts.pci_class:06x}"),
    }
    if facts.subsystem_vendor_id is not None and facts.subsystem_device_id is not None:
        attributes["subsystem_vendor_id"] = Attribute(f"0x{facts.subsystem_vendor_id:04x}")
        attributes["subsystem_device_id"] = Attribute(f"0x{facts.subsystem_device_id:04x}")
    if facts.driver:
        attributes["driver"] = Attribute(facts.driver)
    if facts.numa_node is not None and facts.numa_node >= 0:
        attributes["numa_node"] = Attribute(facts.numa_node)
    if facts.link_speed:
        attributes["pci_link_speed"] = Attribute(facts.link_speed)
    if facts.link_width:
        attributes["pci_link_width"] = Attribute(facts.link_width)
    for prefix, attribute in (("card", "drm_card"), ("renderD", "drm_render")):
        paths = sorted(
            n.devnode
            for n in nodes
            if n.name.startswith(prefix) and n.name[len(prefix) :].isdigit()
        )
        if paths:
            attributes[attribute] = Attribute(",".join(paths))
    return attributes


NO_DRIVER = Problem("no kernel driver bound", recovery_action="bind a driver")


def device_problems(facts: PciFacts, problems: Problems) -> list[Problem]:
    """Everything wrong with a device, in the order health_desc names it."""
    found = [problems[cause] for cause in sorted(problems)]
    return found if facts.driver else [NO_DRIVER, *found]


def build_device(
    facts: PciFacts, nodes: list[DrmNode], problems: Problems, reserved_by: str | None
) -> Device:
    descs = [p.desc for p in device_problems(facts, problems)]
    return Device(
        id=facts.address,
        healthy=not descs,
        health_desc="; ".join(descs),
        hw_locality=DeviceLocality(pci_bus_id=facts.address),
        attributes=device_attributes(facts, nodes),
        reserved_by=reserved_by,
    )


def departed_device(address: str, lease_id: str) -> Device:
    """A reserved device that left the host: shown until its lease ends, so the holder learns."""
    return Device(
        id=address,
        healthy=False,
        health_desc=f"removed from this host while reserved by {lease_id}",
        hw_locality=DeviceLocality(pci_bus_id=address),
        reserved_by=lease_id,
    )


def build_fingerprint(
    devices: Mapping[str, PciFacts],
    drm_nodes: Mapping[str, DrmNode],
    problems: Mapping[str, Problems],
    match_classes: Iterable[str],
    leases: Mapping[str, Lease] | None = None,
) -> Fingerprint:
    match_classes = tuple(match_classes)
    nodes_by_parent: dict[str, list[DrmNode]] = {}
    for node in drm_nodes.values():
        nodes_by_parent.setdefault(node.parent, []).append(node)
    reserved_by = {d: lease.id for lease in (leases or {}).values() for d in lease.devices}
    members: dict[tuple[str, str, str], dict[str, Device]] = {}
    for address, facts in devices.items():
        if not class_matches(facts.pci_class, match_classes):
            continue
        device = build_device(
            facts,
            nodes_by_parent.get(address, []),
            problems.get(address, {}),
            reserved_by.get(address),
        )
        key = (vendor_name(facts.vendor_id), device_type(facts.pci_class), device_name(facts))
        members.setdefault(key, {})[address] = device
    present = {address for group in members.values() for address in group}
    departed: dict[tuple[str, str, str], dict[str, Device]] = {}
    for lease in (leases or {}).values():
        for address, held_in in lease.devices.items():
            if address not in present:
                vendor, type_, name = held_in.split("/", 2)
                departed.setdefault((vendor, type_, name), {})[address] = departed_device(
                    address, lease.id
                )
    groups = {}
    for triple in members.keys() | departed.keys():
        vendor, type_, name = triple
        # a departed device has no attributes left: it does not take the group's away
        shared = common_attributes([d.attributes for d in members.get(triple, {}).values()])
        groups[group_key(vendor, type_, name)] = DeviceGroup(
            vendor=vendor,
            type=type_,
            name=name,
            devices={**members.get(triple, {}), **departed.get(triple, {})},
            attributes=shared,
        )
    return Fingerprint(groups=groups)


def fingerprint_patch(old: Fingerprint, new: Fingerprint) -> Patch | None:
    """The merge patch from ``old``'s JSON to ``new``'s, converting only the groups that differ."""
    groups: dict[str, Any] = {key: None for key in old.groups if key not in new.groups}
    for key, group in new.groups.items():
        before = old.groups.get(key)
        if before is None:
            groups[key] = group.to_json()
        elif before != group:
            groups[key] = json_merge_patch.create_patch(before.to_json(), group.to_json())
    return {"groups": groups} if groups else None


def health_transitions(old: State, new: State) -> list[HealthTransition]:
    """Devices whose health changed between two states, and devices that arrived unhealthy."""
    before = {d.id: d for _, d in old.fingerprint.devices().values()}
    transitions = []
    for group, device in new.fingerprint.devices().values():
        if device.id not in new.devices:
            continue  # departed while reserved: lease_warnings reports it
        previous = before.get(device.id)
        if previous is None and device.healthy:
            continue
        if previous is not None and (previous.healthy, previous.health_desc) == (
            device.healthy,
            device.health_desc,
        ):
            continue
        if device.healthy:
            assert previous is not None
            kind, desc, action = "recovered", previous.health_desc, None
        else:
            problems = device_problems(new.devices[device.id], new.problems.get(device.id, {}))
            kind = "lost" if any(p.lost for p in problems) else "unhealthy"
            actions = [p.recovery_action for p in problems if p.recovery_action]
            desc, action = device.health_desc, actions[0] if actions else None
        transitions.append(
            HealthTransition(kind, device.id, group.vendor, group.name, desc, action)
        )
    return transitions


@attrs.frozen
class LeaseWarning:
    """A reserved device that left the host or turned unhealthy: its holder must hear of it."""

    lease: Lease
    device_id: str
    health_desc: str


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

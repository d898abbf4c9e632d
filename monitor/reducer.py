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
    DeviceGone,
    DeviceSeen,
    DrmNode,
    DrmNodeGone,
    DrmNodeSeen,
    DrmWedged,
    Event,
    PciErrorReported,
    PciFacts,
    Resync,
)
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
    fingerprint: Fingerprint = attrs.field(factory=Fingerprint)


Patch = dict[str, Any]


def reduce(state: State, event: Event) -> tuple[State, Patch | None]:
    """Fold one event into the state."""
    return reduce_all(state, (event,))


def reduce_all(state: State, events: Iterable[Event]) -> tuple[State, Patch | None]:
    """Fold a batch of events into the state, with one patch (and generation) for all of them."""
    scratch = _Scratch(state)
    for event in events:
        scratch.apply(event)
    if not scratch.changed:
        return state, None
    fingerprint = build_fingerprint(
        scratch.devices, scratch.drm_nodes, scratch.problems, scratch.match_classes
    )
    patch = fingerprint_patch(state.fingerprint, fingerprint)
    new = State(
        generation=state.generation + (patch is not None),
        match_classes=scratch.match_classes,
        devices=scratch.devices,
        drm_nodes=scratch.drm_nodes,
        problems=scratch.problems,
        fingerprint=fingerprint,
    )
    return new, patch


class _Scratch:
    """Mutable working copies of one state's facts, private to one ``reduce_all`` call."""

    def __init__(self, state: State) -> None:
        self.match_classes = state.match_classes
        self.devices = dict(state.devices)
        self.drm_nodes = dict(state.drm_nodes)
        self.problems = {k: dict(v) for k, v in state.problems.items()}
        self.changed = False

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


def build_device(facts: PciFacts, nodes: list[DrmNode], problems: Problems) -> Device:
    descs = [p.desc for p in device_problems(facts, problems)]
    return Device(
        id=facts.address,
        healthy=not descs,
        health_desc="; ".join(descs),
        hw_locality=DeviceLocality(pci_bus_id=facts.address),
        attributes=device_attributes(facts, nodes),
    )


def build_fingerprint(
    devices: Mapping[str, PciFacts],
    drm_nodes: Mapping[str, DrmNode],
    problems: Mapping[str, Problems],
    match_classes: Iterable[str],
) -> Fingerprint:
    match_classes = tuple(match_classes)
    nodes_by_parent: dict[str, list[DrmNode]] = {}
    for node in drm_nodes.values():
        nodes_by_parent.setdefault(node.parent, []).append(node)
    members: dict[tuple[str, str, str], dict[str, Device]] = {}
    for address, facts in devices.items():
        if not class_matches(facts.pci_class, match_classes):
            continue
        device = build_device(facts, nodes_by_parent.get(address, []), problems.get(address, {}))
        key = (vendor_name(facts.vendor_id), device_type(facts.pci_class), device_name(facts))
        members.setdefault(key, {})[address] = device
    groups = {}
    for (vendor, type_, name), group_devices in members.items():
        shared = common_attributes([d.attributes for d in group_devices.values()])
        groups[group_key(vendor, type_, name)] = DeviceGroup(
            vendor=vendor, type=type_, name=name, devices=group_devices, attributes=shared
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

"""From the daemon's snapshot to what the kubelet is told: per resource name, each device with
its health and NUMA node.

Pure: plain data in, frozen data out. What the daemon sends is checked here as a stranger's
input: a group or device that is not what the protocol says is left out and named in
``skipped``, so one bad entry never costs the others.

A device is Healthy for the kubelet when the daemon says it is healthy and nobody but the
kubelet holds it: a device reserved outside Kubernetes (a person's ``hotplug-monitor reserve``,
Nomad) is reported Unhealthy, so that the scheduler places no pod on it; one held by the kubelet
stays Healthy (the kubelet decides among its own pods).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import attrs

from monitor.adapters.kubelet.options import OWNER, PCI_ADDRESS, Options

UNREACHABLE = "hotplug-monitor daemon not reachable"
MAX_TEXT = 256
MAX_NUMA_NODE = 1023
_DEVICE_ID = re.compile(r"[A-Za-z0-9:._-]{1,64}")


def _text(value: object, limit: int = MAX_TEXT) -> str | None:
    if isinstance(value, str) and value and len(value) <= limit and value.isprintable():
        return value
    return None


@attrs.frozen
class KubeDevice:
    id: str  # the PCI address: what Allocate and PodResources name
    healthy: bool
    numa_node: int | None = None
    pci_address: str | None = None  # for closeness on the PCI tree
    why: str = ""  # why it is Unhealthy (for the plugin's log)


@attrs.frozen
class Inventory:
    """Every offered resource's devices (sorted by ID), and why anything was left out."""

    resources: Mapping[str, tuple[KubeDevice, ...]] = attrs.field(factory=dict)
    skipped: tuple[str, ...] = ()

    def devices(self, resource: str) -> tuple[KubeDevice, ...]:
        return self.resources.get(resource, ())

    def find(self, resource: str, device_id: str) -> KubeDevice | None:
        return next((d for d in self.devices(resource) if d.id == device_id), None)


def _uuid(raw: Mapping[str, Any]) -> object:
    attributes = raw.get("attributes")
    uuid = attributes.get("uuid") if isinstance(attributes, Mapping) else None
    return uuid.get("value") if isinstance(uuid, Mapping) else None


def _numa(raw: Mapping[str, Any]) -> int | None:
    attributes = raw.get("attributes")
    node = attributes.get("numa_node") if isinstance(attributes, Mapping) else None
    value = node.get("value") if isinstance(node, Mapping) else None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_NUMA_NODE:
        return value
    return None


def _device(device_id: str, raw: Mapping[str, Any]) -> KubeDevice:
    problems = []
    if raw.get("healthy") is not True:
        problems.append(_text(raw.get("health_desc"), 1024) or "unhealthy")
    holder, owner = raw.get("reserved_by"), raw.get("reserved_owner")
    if holder is not None and owner != OWNER:
        who = f"reservation {_text(holder, 64) or 'unknown'}"
        if owner is not None:
            who += f", owner {_text(owner, 64) or 'unknown'}"
        problems.append(f"reserved outside Kubernetes ({who})")
    locality = raw.get("hw_locality")
    bus_id = locality.get("pci_bus_id") if isinstance(locality, Mapping) else None
    if not (isinstance(bus_id, str) and PCI_ADDRESS.fullmatch(bus_id)):
        bus_id = device_id if PCI_ADDRESS.fullmatch(device_id) else None
    return KubeDevice(
        id=device_id,
        healthy=not problems,
        numa_node=_numa(raw),
        pci_address=bus_id,
        why="; ".join(problems),
    )


def inventory(snapshot: object, options: Options) -> Inventory:
    """The daemon's snapshot as the kubelet's resources, by ``options``' naming rules."""
    groups = snapshot.get("groups") if isinstance(snapshot, Mapping) else None
    if not isinstance(groups, Mapping):
        return Inventory(skipped=("the snapshot has no groups",))
    skipped: list[str] = []
    resources: dict[str, dict[str, KubeDevice]] = {}
    seen: set[str] = set()
    for key in sorted(k for k in groups if isinstance(k, str)):
        group = groups[key]
        if not isinstance(group, Mapping):
            skipped.append(f"group {key[:80]!r}: not an object")
            continue
        vendor, type_, name = (_text(group.get(k)) for k in ("vendor", "type", "name"))
        if vendor is None or type_ is None or name is None:
            skipped.append(f"group {key[:80]!r}: no usable vendor, type and name")
            continue
        resource = options.resource_for(vendor, type_, name)
        if resource is None:
            continue
        devices = group.get("devices")
        if not isinstance(devices, Mapping):
            skipped.append(f"group {key[:80]!r}: devices is not an object")
            continue
        for device_id in sorted(d for d in devices if isinstance(d, str)):
            raw = devices[device_id]
            if not _DEVICE_ID.fullmatch(device_id) or not isinstance(raw, Mapping):
                skipped.append(f"device {device_id[:80]!r} in {key[:80]!r}: unusable")
                continue
            if options.ignores(device_id, _uuid(raw)) or device_id in seen:
                continue
            seen.add(device_id)
            resources.setdefault(resource, {})[device_id] = _device(device_id, raw)
    return Inventory(
        resources={r: tuple(d[i] for i in sorted(d)) for r, d in sorted(resources.items())},
        skipped=tuple(skipped),
    )


def unreachable(last: Inventory) -> Inventory:
    """The last devices, each Unhealthy because the daemon cannot be asked: the kubelet keeps
    them (capacity stays) but allocatable drops, and no new pod lands on them."""
    return Inventory(
        resources={
            resource: tuple(attrs.evolve(d, healthy=False, why=UNREACHABLE) for d in devices)
            for resource, devices in last.resources.items()
        }
    )

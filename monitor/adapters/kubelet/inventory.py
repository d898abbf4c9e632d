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

from collections.abc import Mapping
from typing import Any

import attrs

from monitor.adapters import grpc_edge
from monitor.adapters.kubelet.options import OWNER, Options
from monitor.wire.snapshot import devices, groups, pci_bus_id, problems, uuid_of

UNREACHABLE = grpc_edge.UNREACHABLE
MAX_NUMA_NODE = 1023


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


def _numa(raw: Mapping[str, Any]) -> int | None:
    attributes = raw.get("attributes")
    node = attributes.get("numa_node") if isinstance(attributes, Mapping) else None
    value = node.get("value") if isinstance(node, Mapping) else None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_NUMA_NODE:
        return value
    return None


def _device(device_id: str, raw: Mapping[str, Any]) -> KubeDevice:
    why = problems(raw, OWNER, "Kubernetes")
    return KubeDevice(
        id=device_id,
        healthy=not why,
        numa_node=_numa(raw),
        pci_address=pci_bus_id(device_id, raw),
        why="; ".join(why),
    )


def inventory(snapshot: object, options: Options) -> Inventory:
    """The daemon's snapshot as the kubelet's resources, by ``options``' naming rules."""
    skipped: list[str] = []
    resources: dict[str, dict[str, KubeDevice]] = {}
    seen: set[str] = set()
    for group in groups(snapshot, skipped):
        resource = options.resource_for(group.vendor, group.type, group.name)
        if resource is None:
            continue
        for device_id, raw in devices(group, skipped):
            ignored = options.ignores(device_id, uuid_of(raw), pci_bus_id(device_id, raw))
            if ignored or device_id in seen:
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

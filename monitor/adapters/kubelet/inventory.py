"""From the daemon's snapshot to what the kubelet is told: per resource name, each device with
its health and NUMA node.

Pure: plain data in, frozen data out. What the daemon sends is checked here as a stranger's
input: a group or device that is not what the protocol says is left out and named in
``skipped``, so one bad entry never costs the others.

A device is Healthy for the kubelet when the daemon says it is healthy and nobody but the
kubelet holds it: a device reserved outside Kubernetes (a person's ``hotplug-monitor reserve``,
Nomad) is reported Unhealthy, so that the scheduler places no pod on it; one held by the kubelet
stays Healthy (the kubelet decides among its own pods).

MIG instances are named by ``--mig-strategy`` (``options``); what a strategy leaves out is said
in one line of ``skipped`` (logged once per change): every instance under ``none``, and under
``single`` the instances of a resource that would mix profiles or hold whole GPUs too (as
NVIDIA's plugin refuses such a node under its single strategy).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from monitor.adapters import grpc_edge
from monitor.adapters.kubelet.options import MIG_NONE, MIG_SINGLE, OWNER, Options
from monitor.wire.snapshot import (
    devices,
    groups,
    is_mig_type,
    mig_profile_of,
    pci_bus_id,
    problems,
)

UNREACHABLE = grpc_edge.UNREACHABLE
MAX_NUMA_NODE = 1023


@attrs.frozen
class KubeDevice:
    id: str  # the daemon's ID (a PCI address, a MIG UUID, a replica's): what the kubelet names
    healthy: bool
    numa_node: int | None = None
    pci_address: str | None = None  # for closeness on the PCI tree (a MIG instance's GPU's)
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
    migs: dict[str, dict[str, str]] = {}  # MIG instances' profiles, by resource, by device
    not_offered: list[str] = []  # MIG instances --mig-strategy none leaves out
    seen: set[str] = set()
    for group in groups(snapshot, skipped):
        mig = is_mig_type(group.type)
        for device_id, raw in devices(group, skipped):
            if options.ignores(device_id, raw) or device_id in seen:
                continue
            profile = mig_profile_of(raw) if mig else None
            if mig and profile is None:
                skipped.append(f"MIG instance {device_id} in {group.key[:80]!r}: no usable profile")
                continue
            if mig and options.mig_strategy == MIG_NONE:
                not_offered.append(device_id)
                continue
            resource = options.resource_for(group.vendor, group.type, group.name, profile)
            if resource is None:
                continue
            seen.add(device_id)
            resources.setdefault(resource, {})[device_id] = _device(device_id, raw)
            if profile is not None:
                migs.setdefault(resource, {})[device_id] = profile
    notes = []
    if not_offered:
        notes.append(
            f"{len(not_offered)} MIG instances ({', '.join(not_offered[:4])}"
            f"{', ...' if len(not_offered) > 4 else ''}): --mig-strategy none offers none, "
            "and their GPUs are not leased whole while they have instances; "
            "use --mig-strategy mixed or single"
        )
    if options.mig_strategy == MIG_SINGLE:
        for resource, instances in sorted(migs.items()):
            why = _not_single(resources[resource], instances)
            if why:
                for device_id in instances:
                    del resources[resource][device_id]
                notes.append(
                    f"{len(instances)} MIG instances not offered as {resource}: "
                    f"--mig-strategy single needs {why}; use --mig-strategy mixed"
                )
    return Inventory(
        resources={r: tuple(d[i] for i in sorted(d)) for r, d in sorted(resources.items()) if d},
        skipped=(*notes, *skipped),
    )


def _not_single(offered: Mapping[str, KubeDevice], instances: Mapping[str, str]) -> str:
    """Why the MIG instances of one resource (their profiles by ID) do not fit the single
    strategy, or ``""``."""
    profiles = sorted(set(instances.values()))
    if len(profiles) > 1:
        return f"one profile for all, not {', '.join(profiles)}"
    whole = sorted(set(offered) - set(instances))
    if whole:
        return f"every GPU split alike, not whole GPUs beside ({', '.join(whole[:4])})"
    return ""


def unreachable(last: Inventory) -> Inventory:
    """The last devices, each Unhealthy because the daemon cannot be asked: the kubelet keeps
    them (capacity stays) but allocatable drops, and no new pod lands on them."""
    return Inventory(
        resources={
            resource: tuple(attrs.evolve(d, healthy=False, why=UNREACHABLE) for d in devices)
            for resource, devices in last.resources.items()
        }
    )

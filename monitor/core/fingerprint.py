"""From the state's facts to the fingerprint clients see, and the patch between two.

Pure derivation: the same facts always give the same fingerprint. Which facts there are is the
rules' business (``monitor.core.rules``).
"""

from __future__ import annotations

from collections.abc import Set
from typing import Any

import json_merge_patch

from monitor.core.events import DrmNode, NvmlGpu, PciFacts
from monitor.core.health import device_problems
from monitor.core.leases import Lease
from monitor.core.model import (
    Attribute,
    Device,
    DeviceGroup,
    DeviceLocality,
    Fingerprint,
    attributes_json,
    common_attributes,
    group_key,
)
from monitor.core.pci import class_matches, device_type, vendor_name
from monitor.core.state import State

Patch = dict[str, Any]


def device_attributes(
    facts: PciFacts,
    nodes: list[DrmNode],
    gpu: NvmlGpu | None = None,
    xids: tuple[int, int] | None = None,
) -> dict[str, Attribute]:
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
    if gpu is not None:
        attributes.update(gpu.attributes)
        attributes["uuid"] = Attribute(gpu.uuid)
    if xids is not None:
        attributes["last_xid"] = Attribute(xids[0])
        attributes["xid_count"] = Attribute(xids[1])
    return attributes


def build_device(
    facts: PciFacts, state: State, nodes: list[DrmNode], lease: Lease | None
) -> Device:
    address = facts.address
    descs = [p.desc for p in device_problems(facts, state.problems.get(address, {}))]
    return Device(
        id=address,
        healthy=not descs,
        health_desc="; ".join(descs),
        hw_locality=DeviceLocality(pci_bus_id=address),
        attributes=device_attributes(
            facts, nodes, state.nvml.get(address), state.xids.get(address)
        ),
        reserved_by=lease.id if lease else None,
        reserved_owner=lease.owner if lease else None,
    )


def departed_device(address: str, lease: Lease) -> Device:
    """A reserved device that left the host: shown until its lease ends, so the holder learns."""
    return Device(
        id=address,
        healthy=False,
        health_desc=f"removed from this host while reserved by {lease.id}",
        hw_locality=DeviceLocality(pci_bus_id=address),
        reserved_by=lease.id,
        reserved_owner=lease.owner,
    )


def build_fingerprint(
    state: State, previous: Fingerprint | None = None, dirty: Set[str] | None = None
) -> Fingerprint:
    """The fingerprint of ``state``. Given the ``previous`` fingerprint and the devices changed
    since (``dirty``), the other devices and untouched groups are taken over as they are.

    A device is shown once it has a name (``State.names``): a GPU that waits for NVML's is not
    shown until then."""
    reuse = previous.devices() if previous is not None and dirty is not None else {}
    nodes_by_parent: dict[str, list[DrmNode]] = {}
    for node in state.drm_nodes.values():
        nodes_by_parent.setdefault(node.parent, []).append(node)
    reserved_by = {d: lease for lease in state.leases.values() for d in lease.devices}
    members: dict[tuple[str, str, str], dict[str, Device]] = {}
    for address, facts in state.devices.items():
        name = state.names.get(address)
        if name is None or not class_matches(facts.pci_class, state.match_classes):
            continue
        kept = reuse.get(address)
        if kept is not None and dirty is not None and address not in dirty:
            device = kept[1]
        else:
            device = build_device(
                facts, state, nodes_by_parent.get(address, []), reserved_by.get(address)
            )
        triple = (vendor_name(facts.vendor_id), device_type(facts.pci_class), name)
        members.setdefault(triple, {})[address] = device
    present = {address for group in members.values() for address in group}
    departed: dict[tuple[str, str, str], dict[str, Device]] = {}
    for lease in state.leases.values():
        for address, held_in in lease.devices.items():
            if address not in present:
                vendor, type_, name = held_in.split("/", 2)
                departed.setdefault((vendor, type_, name), {})[address] = departed_device(
                    address, lease
                )
    before = previous.groups if previous is not None else {}
    groups: dict[str, DeviceGroup] = {}
    for triple in members.keys() | departed.keys():
        vendor, type_, name = triple
        key = group_key(vendor, type_, name)
        devices = {**members.get(triple, {}), **departed.get(triple, {})}
        old = before.get(key)
        if (
            old is not None
            and old.devices.keys() == devices.keys()
            and all(old.devices[i] is d for i, d in devices.items())
        ):
            groups[key] = old  # nothing in it changed
            continue
        # a departed device has no attributes left: it does not take the group's away
        shared = common_attributes([d.attributes for d in members.get(triple, {}).values()])
        groups[key] = DeviceGroup(
            vendor=vendor, type=type_, name=name, devices=devices, attributes=shared
        )
    return Fingerprint(groups=groups)


def fingerprint_patch(old: Fingerprint, new: Fingerprint) -> Patch | None:
    """The merge patch from ``old``'s JSON to ``new``'s, converting only what differs."""
    groups: dict[str, Any] = {key: None for key in old.groups if key not in new.groups}
    for key, group in new.groups.items():
        before = old.groups.get(key)
        if before is None:
            groups[key] = group.to_json()
        elif before is not group:
            patch = group_patch(before, group)
            if patch:
                groups[key] = patch
    return {"groups": groups} if groups else None


def group_patch(before: DeviceGroup, after: DeviceGroup) -> Patch:
    """The merge patch between two versions of one group (same key: same vendor, type, name)."""
    patch: Patch = {}
    if before.attributes != after.attributes:
        patch["attributes"] = json_merge_patch.create_patch(
            attributes_json(before.attributes), attributes_json(after.attributes)
        )
    devices: dict[str, Any] = {i: None for i in before.devices if i not in after.devices}
    for device_id, device in after.devices.items():
        old = before.devices.get(device_id)
        if old is None:
            devices[device_id] = device.to_json()
        elif old is not device and old != device:
            devices[device_id] = json_merge_patch.create_patch(old.to_json(), device.to_json())
    if devices:
        patch["devices"] = devices
    return patch

"""From the state's facts to the fingerprint clients see, and the patch between two.

Pure derivation: the same facts always give the same fingerprint. Which facts there are is the
rules' business (``monitor.core.rules``).
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from typing import Any

import attrs
import json_merge_patch

from monitor.core.conditions import judge_all
from monitor.core.conditions import shown as shown_conditions
from monitor.core.events import DrmNode, NvmlGpu, PciFacts
from monitor.core.health import (
    CAUSE_NVML_UUID,
    HEALTHY,
    UNHEALTHY,
    device_health,
    device_problems,
)
from monitor.core.leases import Lease
from monitor.core.mig_devices import cap_nodes, instance_device, mig_group
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
from monitor.core.replicas import base_id, replica_id, shared_type, split
from monitor.core.state import State
from monitor.core.xids import xid_action

Patch = dict[str, Any]
MIG_MODES = {False: "disabled", True: "enabled"}


def device_attributes(
    facts: PciFacts,
    nodes: list[DrmNode],
    gpu: NvmlGpu | None = None,
    xids: tuple[int, int] | None = None,
    xid_action: str | None = None,
    xid_source: str | None = None,
    conditions: str = "",
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
        if gpu.uuid:
            attributes["uuid"] = Attribute(gpu.uuid)
    if xids is not None:
        attributes["last_xid"] = Attribute(xids[0])
        attributes["xid_count"] = Attribute(xids[1])
        if xid_source:
            attributes["last_xid_source"] = Attribute(xid_source)
    if xid_action is not None:
        attributes["last_xid_action"] = Attribute(xid_action)  # the exporter's action label
    if conditions:  # "row_remap_pending=needs reset,thermal_slowdown=reported"
        attributes["health_conditions"] = Attribute(conditions)
    return attributes


def build_device(
    facts: PciFacts,
    state: State,
    nodes: list[DrmNode],
    lease: Lease | None,
    before: Device | None = None,
) -> Device:
    """The device as shown; its attributes are ``before``'s very mapping when they are equal,
    so that a change of its lease or health leaves them, and its group's, as they were."""
    address = facts.address
    problems = state.problems.get(address, {})
    descs = [p.desc for p in device_problems(facts, problems)]
    health = device_health(facts, problems)
    gpu = state.nvml.get(address)
    if gpu is not None and CAUSE_NVML_UUID in state.problems.get(address, {}):
        gpu = attrs.evolve(gpu, uuid="")  # it names no GPU (monitor.core.rules.nvidia)
    xids = state.xids.get(address)
    attributes: Mapping[str, Attribute] = device_attributes(
        facts,
        nodes,
        gpu,
        xids,
        xid_action(xids[0]) if xids else None,
        state.xid_sources.get(address),
        shown_conditions(
            judge_all(state.conditions.get(address, {}), state.health_policy).values()
        ),
    )
    layout = state.mig.get(address)
    if layout is not None and gpu is not None:  # read again with each change of its layout
        attributes = {**attributes, "mig_mode": Attribute(MIG_MODES[layout.enabled])}
    if before is not None and before.attributes == attributes:
        attributes = before.attributes
    return Device(
        id=address,
        healthy=not descs,
        health_desc="; ".join(descs),
        hw_locality=DeviceLocality(pci_bus_id=address),
        attributes=attributes,
        reserved_by=lease.id if lease else None,
        reserved_owner=lease.owner if lease else None,
        health=None if health == HEALTHY else health,
    )


def replica_device(
    device: Device, k: int, count: int, lease: Lease | None, before: Device | None
) -> Device:
    """Replica ``k`` of ``count`` of a shared device: the device's health and attributes (its
    UUID among them, so that a holder's container edits are the device's), its number, and its
    own lease."""
    attributes: Mapping[str, Attribute] = {
        **device.attributes,
        "replica": Attribute(k),
        "replicas": Attribute(count),
    }
    if before is not None and before.attributes == attributes:
        attributes = before.attributes
    return attrs.evolve(
        device,
        id=replica_id(device.id, k),
        attributes=attributes,
        reserved_by=lease.id if lease else None,
        reserved_owner=lease.owner if lease else None,
    )


def departed_device(device_id: str, lease: Lease, address: str | None = None) -> Device:
    """A reserved device that left the host: shown until its lease ends, so the holder learns."""
    return Device(
        id=device_id,
        healthy=False,
        health_desc=f"removed from this host while reserved by {lease.id}",
        hw_locality=DeviceLocality(pci_bus_id=address or base_id(device_id)),
        reserved_by=lease.id,
        reserved_owner=lease.owner,
        health=UNHEALTHY,
    )


def build_fingerprint(
    state: State, previous: Fingerprint | None = None, dirty: Set[str] | None = None
) -> Fingerprint:
    """The fingerprint of ``state``. Given the ``previous`` fingerprint and the devices changed
    since (``dirty``), only those devices and their groups are built again: the cost of a change
    is that of the devices it touched, not of every PCI function on the host.

    A device is shown once it has a name (``State.names``): a GPU that waits for NVML's is not
    shown until then. A reserved device that is not shown (it left) stays in its lease's group."""
    if previous is None or dirty is None:
        previous, dirty = Fingerprint(), set(state.devices) | _leased(state).keys()
    if not dirty:
        return previous
    leased = _leased(state)
    index = previous.devices()
    ids = _device_ids(state, dirty, index, leased)
    bases = {state.parent_of(d) for d in ids}
    nodes: dict[str, list[DrmNode]] = {}
    for node in state.drm_nodes.values():
        if node.parent in bases:
            nodes.setdefault(node.parent, []).append(node)
    built: dict[str, Device] = {}  # each shared device, built once for all its replicas
    members: dict[str, dict[str, Device]] = {}  # each group touched, as it is now
    names: dict[str, tuple[str, str, str]] = {}  # their vendor, type and name

    def group(key: str) -> dict[str, Device]:
        if key not in members:
            old = previous.groups.get(key)
            members[key] = dict(old.devices) if old is not None else {}
            if old is not None:
                names[key] = (old.vendor, old.type, old.name)
        return members[key]

    stale: set[str] = set()  # groups whose shared attributes must be found again
    for address in ids:
        was_in, before = index.get(address, (None, None))
        if was_in is not None:
            group(was_in.key).pop(address)
        base = state.parent_of(address)
        placed = _place(state, address, nodes.get(base, []), leased, before, built)
        key = None
        if placed is not None:
            triple, device = placed
            key = group_key(*triple)
            group(key)[address] = device
            names.setdefault(key, triple)
        if was_in is None or was_in.key != key:  # it joined a group, left one, or both
            stale.update(k for k in (key, was_in.key if was_in else None) if k is not None)
        elif before is None or device.attributes is not before.attributes:
            stale.add(key)
    groups = dict(previous.groups)
    for key, devices in members.items():
        old = previous.groups.get(key)
        if not devices:
            groups.pop(key, None)
        elif (
            old is None
            or old.devices.keys() != devices.keys()
            or any(old.devices[i] is not d for i, d in devices.items())
        ):
            vendor, type_, name = names[key]
            if old is not None and key not in stale:
                shared = old.attributes
            else:  # a departed device has no attributes left: it does not take the group's away
                shown = [
                    d.attributes for i, d in devices.items() if _is_shown(state, state.parent_of(i))
                ]
                shared = common_attributes(shown)
            groups[key] = DeviceGroup(
                vendor=vendor, type=type_, name=name, devices=devices, attributes=shared
            )
    return Fingerprint(groups=groups)


def _leased(state: State) -> dict[str, Lease]:
    return {d: lease for lease in state.leases.values() for d in lease.devices}


def _device_ids(
    state: State,
    dirty: Set[str],
    index: Mapping[str, tuple[DeviceGroup, Device]],
    leased: Mapping[str, Lease],
) -> list[str]:
    """The IDs to build again for these devices (and replicas): each device, and its replicas
    as they were shown, as they are now and as leases hold them; and each GPU's MIG devices
    (those that left are named by the layout's own touch). A departed replica is not found
    here once its lease ended: the lease's own touch names it."""
    ids = set(dirty)
    bases = {state.parent_of(d) for d in dirty}
    ids.update(bases)
    for address in bases:
        ids.update(i.uuid for i in state.mig_instances(address))
        for k in range(state.replicas.get(address, 0)):  # kept only for shared devices
            ids.add(replica_id(address, k))
        k = 0
        while replica_id(address, k) in index:
            ids.add(replica_id(address, k))
            k += 1
    ids.update(d for d in leased if d not in ids and state.parent_of(d) in bases)
    return sorted(ids)


def _is_shown(state: State, address: str) -> bool:
    facts = state.devices.get(address)
    return (
        facts is not None
        and address in state.names
        and class_matches(facts.pci_class, state.match_classes)
    )


def _place(
    state: State,
    device_id: str,
    nodes: list[DrmNode],
    leased: Mapping[str, Lease],
    before: Device | None,
    built: dict[str, Device],
) -> tuple[tuple[str, str, str], Device] | None:
    """The group (vendor, type, name) a device, replica or MIG device is shown in and the
    device, if it is shown: a shared device is shown as its replicas alone, in a ``.shared``
    group; a GPU with MIG devices as those alone, in ``mig`` groups, unless a lease holds it
    whole (a whole lease blocks its MIG devices until it ends)."""
    lease = leased.get(device_id)
    mig = state.mig_instance(device_id)
    if mig is not None:
        address, instance = mig
        if _is_shown(state, address) and address not in leased:
            parent = _whole(state, address, nodes, built)
            vendor = vendor_name(state.devices[address].vendor_id)
            device = instance_device(
                parent,
                instance,
                caps=cap_nodes(state.mig_minors, state.nvidia_minor(address), instance),
                problems=state.problems.get(device_id, {}),
                xids=state.xids.get(device_id),
                xid_source=state.xid_sources.get(device_id),
                lease=lease,
                before=before,
            )
            return mig_group(vendor, state.names[address], instance), device
        return _departed(device_id, lease, address)
    address, k = split(device_id)
    count = state.replicas.get(address, 1)
    in_parts = k is None and lease is None and bool(state.mig_instances(address))
    if (
        _is_shown(state, address)
        and (count > 1) == (k is not None)
        and (k or 0) < count
        and not in_parts
    ):
        facts = state.devices[address]
        vendor, type_ = vendor_name(facts.vendor_id), device_type(facts.pci_class)
        if k is None:
            return (vendor, type_, state.names[address]), build_device(
                facts, state, nodes, lease, before
            )
        replica = replica_device(_whole(state, address, nodes, built), k, count, lease, before)
        return (vendor, shared_type(type_), state.names[address]), replica
    return _departed(device_id, lease)


def _whole(state: State, address: str, nodes: list[DrmNode], built: dict[str, Device]) -> Device:
    """The device at ``address`` built whole and unleased, once for all its replicas or MIG
    devices."""
    device = built.get(address)
    if device is None:
        device = built[address] = build_device(state.devices[address], state, nodes, None)
    return device


def _departed(
    device_id: str, lease: Lease | None, address: str | None = None
) -> tuple[tuple[str, str, str], Device] | None:
    if lease is None:
        return None
    vendor, type_, name = lease.devices[device_id].split("/", 2)
    return (vendor, type_, name), departed_device(device_id, lease, address)


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

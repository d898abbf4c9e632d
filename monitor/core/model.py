"""The fingerprint data model (Nomad's device-plugin types, snake_case) and its JSON form.

Everything here is frozen: collections are tuples or read-only mappings built by converters, so a
snapshot handed to the server cannot change under it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

import attrs

AttributeValue = str | int | float | bool
JSON = dict[str, Any]

# A device's ID: its PCI address exactly as the kernel writes it (lower-case hex, 4-digit domain).
PCI_ADDRESS = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")


def frozen_mapping(items: Mapping[str, Any]) -> Mapping[str, Any]:
    """A read-only copy of ``items``, with its keys sorted so that JSON output is stable.

    A mapping already frozen (made here) is taken as it is: evolving a state then costs nothing
    for the fields a change did not touch."""
    if isinstance(items, MappingProxyType):
        return items
    return MappingProxyType(dict(sorted(items.items())))


def frozen_tuple(items: Iterable[Any]) -> tuple[Any, ...]:
    return tuple(items)


@attrs.frozen
class Attribute:
    """An attribute value, with a Nomad unit (``MiB``, ``MHz``, ``W``, ``MB/s``) if it has one."""

    value: AttributeValue
    unit: str | None = None

    def to_json(self) -> JSON:
        if self.unit is None:
            return {"value": self.value}
        return {"value": self.value, "unit": self.unit}


Attributes = Mapping[str, Attribute]


@attrs.frozen
class DeviceLocality:
    pci_bus_id: str


@attrs.frozen
class Device:
    id: str
    healthy: bool
    health_desc: str
    hw_locality: DeviceLocality
    attributes: Attributes = attrs.field(converter=frozen_mapping, factory=dict)
    reserved_by: str | None = None  # the lease holding it
    reserved_owner: str | None = None  # that lease's owner (a scheduler), if it has one
    health: str | None = None  # when not healthy: "needs reset" or "unhealthy" (health.py)

    def to_json(self) -> JSON:
        json = {
            "id": self.id,
            "healthy": self.healthy,
            "health_desc": self.health_desc,
            "hw_locality": {"pci_bus_id": self.hw_locality.pci_bus_id},
            "attributes": attributes_json(self.attributes),
        }
        if self.reserved_by is not None:  # absent, not null: null in a merge patch deletes
            json["reserved_by"] = self.reserved_by
        if self.reserved_owner is not None:
            json["reserved_owner"] = self.reserved_owner
        if self.health is not None:
            json["health"] = self.health
        return json


@attrs.frozen
class DeviceGroup:
    vendor: str
    type: str
    name: str
    devices: Mapping[str, Device] = attrs.field(converter=frozen_mapping)
    attributes: Attributes = attrs.field(converter=frozen_mapping, factory=dict)

    @property
    def key(self) -> str:
        return group_key(self.vendor, self.type, self.name)

    def to_json(self) -> JSON:
        return {
            "vendor": self.vendor,
            "type": self.type,
            "name": self.name,
            "attributes": attributes_json(self.attributes),
            "devices": {device_id: d.to_json() for device_id, d in self.devices.items()},
        }


@attrs.frozen
class Fingerprint:
    """The current set of device groups, keyed by ``vendor/type/name``."""

    groups: Mapping[str, DeviceGroup] = attrs.field(converter=frozen_mapping, factory=dict)
    # Every device by ID with its group: made on first use, as the fingerprint never changes.
    _by_device: Mapping[str, tuple[DeviceGroup, Device]] | None = attrs.field(
        default=None, init=False, eq=False, repr=False
    )

    def to_json(self) -> JSON:
        return {"groups": {key: group.to_json() for key, group in self.groups.items()}}

    def devices(self) -> Mapping[str, tuple[DeviceGroup, Device]]:
        """Every device by ID, with the group it is in."""
        if self._by_device is None:
            index = {d.id: (g, d) for g in self.groups.values() for d in g.devices.values()}
            object.__setattr__(self, "_by_device", MappingProxyType(index))
        assert self._by_device is not None
        return self._by_device


@attrs.frozen
class Mount:
    task_path: str
    host_path: str
    read_only: bool


@attrs.frozen
class DeviceSpec:
    task_path: str
    host_path: str
    cgroup_perms: str


@attrs.frozen
class ContainerReservation:
    envs: Mapping[str, str] = attrs.field(converter=frozen_mapping, factory=dict)
    mounts: tuple[Mount, ...] = attrs.field(converter=frozen_tuple, factory=tuple)
    devices: tuple[DeviceSpec, ...] = attrs.field(converter=frozen_tuple, factory=tuple)

    @property
    def empty(self) -> bool:
        """Nothing a container engine could inject (environment variables aside)."""
        return not self.devices and not self.mounts

    def to_json(self) -> JSON:
        return {
            "envs": dict(self.envs),
            "mounts": [
                {"task_path": m.task_path, "host_path": m.host_path, "read_only": m.read_only}
                for m in self.mounts
            ],
            "devices": [
                {"task_path": d.task_path, "host_path": d.host_path, "cgroup_perms": d.cgroup_perms}
                for d in self.devices
            ],
        }


def group_key(vendor: str, type_: str, name: str) -> str:
    return f"{vendor}/{type_}/{name}"


def attributes_json(attributes: Attributes) -> JSON:
    return {name: a.to_json() for name, a in attributes.items()}


def common_attributes(members: list[Attributes]) -> dict[str, Attribute]:
    """The attributes that every member has, with the same value and unit."""
    if not members:
        return {}
    first, rest = members[0], members[1:]
    return {k: v for k, v in first.items() if all(m.get(k) == v for m in rest)}

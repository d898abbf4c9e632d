"""What an adapter reads of the daemon's snapshot, every value checked before it is used.

The daemon is trusted to be the daemon, not to be right: a group or device that is not the
shape the protocol says is skipped with a reason, never a crash or a broken answer to the
scheduler. Each adapter walks the snapshot with ``groups`` and ``devices`` and says in its own
words what it does with what passes.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import attrs

MAX_TEXT = 256
PCI_ADDRESS = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")
DEVICE_ID = re.compile(r"[A-Za-z0-9:._-]{1,64}")  # safe to print and to hand on anywhere
# Replica k of a shared device (time-sliced): ``<PCI address>::<k>``, in a ``TYPE.shared`` group.
REPLICA_ID = re.compile(r"([0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7])::(0|[1-9][0-9]?)")


# A MIG instance: its ID is its MIG UUID, in a ``mig`` group (``mig.shared`` for its replicas
# ``<MIG UUID>::<k>``); its GPU is not a device of its own while it has instances.
MIG_TYPE = "mig"
MIG_UUID = re.compile(
    r"MIG-[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
MIG_REPLICA_ID = re.compile(rf"({MIG_UUID.pattern})::(0|[1-9][0-9]?)")
# NVIDIA's profile names: ``1g.10gb``, ``1g.10gb+me``, ``1c.3g.40gb`` (a compute instance
# smaller than its GPU instance), ``7g.80gb``.
MIG_PROFILE = re.compile(r"([1-9][0-9]?c\.)?[1-9][0-9]?g\.[0-9]{1,4}gb(\+[a-z]{1,8}){0,4}")


def replica_of(device_id: str) -> tuple[str, int] | None:
    """The PCI address and number of a replica ID; None for any other ID."""
    match = REPLICA_ID.fullmatch(device_id)
    return (match.group(1), int(match.group(2))) if match else None


def shared_replica_of(device_id: str) -> tuple[str, int] | None:
    """The shared device (a PCI address or a MIG UUID) and number of a replica ID; None for
    any other ID."""
    match = REPLICA_ID.fullmatch(device_id) or MIG_REPLICA_ID.fullmatch(device_id)
    return (match.group(1), int(match.group(match.re.groups))) if match else None


def text(value: object, limit: int = MAX_TEXT) -> str | None:
    """``value`` if it is a non-empty printable string of at most ``limit`` characters."""
    if isinstance(value, str) and value and len(value) <= limit and value.isprintable():
        return value
    return None


def uuid_of(device: Mapping[str, Any]) -> object:
    """An NVIDIA GPU's UUID, from its ``uuid`` attribute (None when it has none); unchecked."""
    attributes = device.get("attributes")
    uuid = attributes.get("uuid") if isinstance(attributes, Mapping) else None
    return uuid.get("value") if isinstance(uuid, Mapping) else None


def _attribute(device: Mapping[str, Any], name: str) -> object:
    attributes = device.get("attributes")
    found = attributes.get(name) if isinstance(attributes, Mapping) else None
    return found.get("value") if isinstance(found, Mapping) else None


def is_mig_type(type_: str) -> bool:
    """Whether a group's type is MIG instances' (``mig``), or their replicas' (``mig.shared``)."""
    return type_ in (MIG_TYPE, f"{MIG_TYPE}.shared")


def mig_profile_of(device: Mapping[str, Any]) -> str | None:
    """A MIG instance's profile (``1g.10gb``), from its ``mig_profile`` attribute; None when
    the device has none or it is not a profile's name."""
    profile = _attribute(device, "mig_profile")
    return profile if isinstance(profile, str) and MIG_PROFILE.fullmatch(profile) else None


def parent_uuid_of(device: Mapping[str, Any]) -> object:
    """A MIG instance's GPU's UUID, from its ``parent_uuid`` attribute (None when it has none);
    unchecked."""
    return _attribute(device, "parent_uuid")


def pci_bus_id(device_id: str, device: Mapping[str, Any]) -> str | None:
    """The device's PCI address: its locality's, else its ID if that is one, else None."""
    locality = device.get("hw_locality")
    bus_id = locality.get("pci_bus_id") if isinstance(locality, Mapping) else None
    if isinstance(bus_id, str) and PCI_ADDRESS.fullmatch(bus_id):
        return bus_id
    return device_id if PCI_ADDRESS.fullmatch(device_id) else None


def problems(device: Mapping[str, Any], owner: str, scheduler: str) -> list[str]:
    """Why ``scheduler`` (whose leases have ``owner``) may not place work on the device: its
    health, or a lease of someone else's. Empty when it may."""
    found = []
    if device.get("healthy") is not True:
        found.append(text(device.get("health_desc"), 1024) or "unhealthy")
    holder, holder_owner = device.get("reserved_by"), device.get("reserved_owner")
    if holder is not None and holder_owner != owner:
        who = f"reservation {text(holder, 64) or 'unknown'}"
        if holder_owner is not None:
            who += f", owner {text(holder_owner, 64) or 'unknown'}"
        found.append(f"reserved outside {scheduler} ({who})")
    return found


@attrs.frozen
class Group:
    key: str
    vendor: str
    type: str
    name: str
    raw: Mapping[str, Any]


def groups(snapshot: object, skipped: list[str]) -> Iterator[Group]:
    """The snapshot's groups with a usable vendor, type and name, in key order; why each other
    one is left out goes to ``skipped`` as it is met."""
    found = snapshot.get("groups") if isinstance(snapshot, Mapping) else None
    if not isinstance(found, Mapping):
        skipped.append("the snapshot has no groups")
        return
    for key in sorted(k for k in found if isinstance(k, str)):
        group = found[key]
        if not isinstance(group, Mapping):
            skipped.append(f"group {key[:80]!r}: not an object")
            continue
        vendor, type_, name = (text(group.get(k)) for k in ("vendor", "type", "name"))
        if vendor is None or type_ is None or name is None:
            skipped.append(f"group {key[:80]!r}: no usable vendor, type and name")
            continue
        yield Group(key, vendor, type_, name, group)


def devices(group: Group, skipped: list[str]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """The group's devices with a usable ID, in ID order; the others go to ``skipped``."""
    found = group.raw.get("devices")
    if not isinstance(found, Mapping):
        skipped.append(f"group {group.key[:80]!r}: devices is not an object")
        return
    for device_id in sorted(d for d in found if isinstance(d, str)):
        raw = found[device_id]
        if not DEVICE_ID.fullmatch(device_id) or not isinstance(raw, Mapping):
            skipped.append(f"device {device_id[:80]!r} in {group.key[:80]!r}: unusable")
            continue
        yield device_id, raw


@attrs.frozen
class GroupPattern:
    """``TYPE``, ``VENDOR/TYPE`` or ``VENDOR/TYPE/NAME``, matched as a Nomad job matches the
    name in its ``device`` block: the parts given must be equal."""

    type: str
    vendor: str | None = None
    name: str | None = None

    @classmethod
    def parse(cls, pattern: str) -> GroupPattern:
        """The pattern; ``ValueError`` saying why it is none."""
        parts = pattern.split("/", 2)
        if any(not p or not p.isprintable() for p in parts) or len(pattern) > MAX_TEXT:
            raise ValueError(
                f"{pattern!r} is not TYPE, VENDOR/TYPE or VENDOR/TYPE/NAME "
                "(e.g. gpu, nvidia/gpu, nvidia/gpu/NVIDIA H100 80GB HBM3)"
            )
        if len(parts) == 1:
            return cls(type=parts[0])
        if len(parts) == 2:
            return cls(vendor=parts[0], type=parts[1])
        return cls(vendor=parts[0], type=parts[1], name=parts[2])

    def matches(self, vendor: str, type_: str, name: str) -> bool:
        return self.type == type_ and self.vendor in (None, vendor) and self.name in (None, name)

    def __str__(self) -> str:
        return "/".join(p for p in (self.vendor, self.type, self.name) if p is not None)


def is_ignored(
    ignored: Collection[str], device_id: str, uuid: object = None, pci_address: str | None = None
) -> bool:
    """Whether an adapter's ignore list names the device by its ID, its GPU's UUID or its PCI
    address (so that ignoring a shared GPU ignores its replicas)."""
    return (
        device_id in ignored
        or (isinstance(uuid, str) and uuid in ignored)
        or (pci_address is not None and pci_address in ignored)
    )


def is_ignored_device(ignored: Collection[str], device_id: str, device: Mapping[str, Any]) -> bool:
    """``is_ignored`` for a device of the snapshot: by its ID, its UUID, its PCI address (a MIG
    instance's is its GPU's) or its GPU's UUID (so that ignoring a GPU ignores its MIG
    instances and their replicas)."""
    return is_ignored(ignored, device_id, uuid_of(device), pci_bus_id(device_id, device)) or (
        is_ignored(ignored, device_id, parent_uuid_of(device))
    )

"""From the daemon's words to Nomad's: the snapshot as device groups, a reservation as a
container reservation, and a stats sample as Nomad's stat objects (a refusal as a gRPC status is
``grpc_edge``'s, shared with the kubelet plugin).

Pure: plain data in, protobuf messages out. What the daemon sends is checked here as a
stranger's input: a group, device or attribute Nomad would reject (its client drops a plugin
whose fingerprint fails validation: an empty vendor, type, name or device ID; an attribute
with a unit it does not know, or a unit on a string) is left out and named in ``skipped``,
so one bad entry never costs the others.

MIG instances come as the daemon groups them, one group a profile (``nvidia/mig/NVIDIA H100
80GB HBM3 MIG 1g.10gb``), their shared attributes (``mig_profile``, ``memory`` in MiB, slices)
the group's, for a job's ``device`` block to constrain on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
from google.protobuf import timestamp_pb2, wrappers_pb2

from monitor.adapters import grpc_edge
from monitor.adapters.nomad.config import PluginConfig
from monitor.adapters.nomad.protos import device_pb2, structs_pb2
from monitor.wire import stats
from monitor.wire.snapshot import (
    MAX_TEXT,
    parent_uuid_of,
    pci_bus_id,
    problems,
    shared_replica_of,
    text,
    uuid_of,
)
from monitor.wire.snapshot import devices as group_devices
from monitor.wire.snapshot import groups as snapshot_groups

NOMAD_OWNER = "nomad"  # the owner name the plugin's leases carry
UNREACHABLE = grpc_edge.UNREACHABLE

# Nomad's units (plugins/shared/structs/units.go): an attribute with any other is invalid.
# fmt: off
NOMAD_UNITS = frozenset((
    "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "kB", "KB", "MB", "GB", "TB", "PB", "EB",
    "KiB/s", "MiB/s", "GiB/s", "TiB/s", "PiB/s", "EiB/s",
    "kB/s", "KB/s", "MB/s", "GB/s", "TB/s", "PB/s", "EB/s",
    "MHz", "GHz", "mW", "W", "kW", "MW", "GW",
))
# fmt: on
INT64 = (-(1 << 63), (1 << 63) - 1)

# Stats Nomad shows as a fraction (used / total), by the numerator's name: the denominator's.
FRACTIONS = {
    stats.MEMORY_USED.name: stats.MEMORY_TOTAL.name,
    stats.BAR1_USED.name: stats.BAR1_TOTAL.name,
}
# The one statistic Nomad's summaries show, the first a device has.
SUMMARY = (stats.MEMORY_USED.name, stats.GPU_UTILIZATION.name)

Triple = tuple[str, str, str]  # vendor, type, name


def attribute(raw: object) -> structs_pb2.Attribute | None:
    """A snapshot attribute (``{"value": v, "unit": u}``) as Nomad's typed attribute, or None
    if Nomad would refuse it."""
    if not isinstance(raw, Mapping):
        return None
    value, unit = raw.get("value"), raw.get("unit")
    if unit is not None and (not isinstance(unit, str) or unit not in NOMAD_UNITS):
        return None  # a number in a unit Nomad cannot compare is worse than none
    if isinstance(value, bool):
        return None if unit else structs_pb2.Attribute(bool_val=value)
    if isinstance(value, int):
        if not INT64[0] <= value <= INT64[1]:
            return None
        return structs_pb2.Attribute(int_val=value, unit=unit or "")
    if isinstance(value, float):
        return (
            structs_pb2.Attribute(float_val=value, unit=unit or "")
            if math.isfinite(value)
            else None
        )
    if isinstance(value, str) and not unit and value.isprintable() and len(value) <= MAX_TEXT:
        return structs_pb2.Attribute(string_val=value)
    return None


def _common(attribute_sets: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The attributes every set has, with the same value: what Nomad can match a group on."""
    if not attribute_sets:
        return {}
    first, *rest = attribute_sets
    return {k: v for k, v in first.items() if all(other.get(k) == v for other in rest)}


@attrs.frozen
class Offered:
    """What the plugin offers Nomad: its device groups, each offered device's group, and why
    anything the daemon reported was left out."""

    groups: tuple[device_pb2.DeviceGroup, ...] = ()
    by_device: Mapping[str, Triple] = attrs.field(factory=dict)
    skipped: tuple[str, ...] = ()

    def instances(self, device_id: str) -> list[str]:
        """The offered devices a stats sample of ``device_id`` is about: the device, or each
        replica of a shared GPU or MIG instance (every holder sees its figures, as it shares
        it)."""
        if device_id in self.by_device:
            return [device_id]
        return [i for i in self.by_device if (r := shared_replica_of(i)) and r[0] == device_id]

    def response(self) -> device_pb2.FingerprintResponse:
        return device_pb2.FingerprintResponse(device_group=list(self.groups))


def not_offered(device_id: str, snapshot: object, config: PluginConfig) -> str | None:
    """Why Nomad may not have ``device_id`` though the daemon may know it (ignored, or in a
    group not offered), or None: then the daemon decides."""
    if config.ignores(device_id):
        return f"{device_id} is not offered to Nomad: it is in ignored_device_ids"
    groups = snapshot.get("groups") if isinstance(snapshot, Mapping) else None
    for group in groups.values() if isinstance(groups, Mapping) else ():
        devices = group.get("devices") if isinstance(group, Mapping) else None
        device = devices.get(device_id) if isinstance(devices, Mapping) else None
        if not isinstance(device, Mapping):
            continue
        if config.ignores(device_id, uuid_of(device)):
            return f"{device_id} is not offered to Nomad: its UUID is in ignored_device_ids"
        if config.ignores(device_id, parent_uuid_of(device)):
            return f"{device_id} is not offered to Nomad: its GPU is in ignored_device_ids"
        if config.ignores(device_id, pci_address=pci_bus_id(device_id, device)):
            return f"{device_id} is not offered to Nomad: its GPU is in ignored_device_ids"
        triple = tuple(str(group.get(k)) for k in ("vendor", "type", "name"))
        if not config.offers(*triple):
            return f"{device_id} is not offered to Nomad: group {'/'.join(triple)} is not in groups"
    return None


def _device(
    device_id: str, raw: Mapping[str, Any]
) -> tuple[device_pb2.DetectedDevice, Mapping[str, Any]]:
    """One device for Nomad, and its attributes (to find the group's common ones)."""
    why = problems(raw, NOMAD_OWNER, "Nomad")  # someone else's lease: no task goes there
    detected = device_pb2.DetectedDevice(
        ID=device_id,
        healthy=not why,
        health_description="; ".join(why),
        hw_locality=device_pb2.DeviceLocality(pci_bus_id=pci_bus_id(device_id, raw) or ""),
    )
    attributes = raw.get("attributes")
    return detected, attributes if isinstance(attributes, Mapping) else {}


def offered(snapshot: object, config: PluginConfig) -> Offered:
    """The daemon's snapshot as Nomad's device groups, filtered by the config: ignored devices
    and groups not offered are left out, as are groups left with no device."""
    skipped: list[str] = []
    groups: list[device_pb2.DeviceGroup] = []
    by_device: dict[str, Triple] = {}
    for group in snapshot_groups(snapshot, skipped):
        key, vendor, type_, name = group.key, group.vendor, group.type, group.name
        if not config.offers(vendor, type_, name):
            continue
        devices: list[device_pb2.DetectedDevice] = []
        attribute_sets: list[Mapping[str, Any]] = []
        for device_id, raw in group_devices(group, skipped):
            if config.ignores_device(device_id, raw) or device_id in by_device:
                continue
            detected, attributes = _device(device_id, raw)
            devices.append(detected)
            if attributes:
                attribute_sets.append(attributes)
            by_device[device_id] = (vendor, type_, name)
        if not devices:
            continue
        shared = _common(attribute_sets) if attribute_sets else group.raw.get("attributes")
        converted: dict[str, structs_pb2.Attribute] = {}
        for attr_name, raw_attribute in shared.items() if isinstance(shared, Mapping) else ():
            value = attribute(raw_attribute) if text(attr_name, 128) else None
            if value is None:
                skipped.append(
                    f"attribute {str(attr_name)[:80]!r} of {key[:80]!r}: not one Nomad takes"
                )
                continue
            converted[attr_name] = value
        groups.append(
            device_pb2.DeviceGroup(
                vendor=vendor,
                device_type=type_,
                device_name=name,
                devices=devices,
                attributes=converted,
            )
        )
    return Offered(groups=tuple(groups), by_device=by_device, skipped=tuple(skipped))


def unreachable(last: Offered) -> Offered:
    """The last devices offered, each unhealthy because the daemon cannot be asked: Nomad keeps
    them (a device that vanished would look removed) but places nothing new on them."""
    groups = []
    for group in last.groups:
        copy = device_pb2.DeviceGroup()
        copy.CopyFrom(group)
        for device in copy.devices:
            device.healthy = False
            device.health_description = UNREACHABLE
        groups.append(copy)
    return Offered(groups=tuple(groups), by_device=last.by_device)


def container_reservation(result: Mapping[str, Any]) -> device_pb2.ContainerReservation:
    """A ``reserve`` answer, already checked (``monitor.wire.reservations.check_reservation``),
    as what the task driver adds to the task's container."""
    return grpc_edge.container_edits(
        result,
        device_pb2.ContainerReservation,
        device_pb2.Mount,
        device_pb2.DeviceSpec,
        path="task_path",
    )


def stat_value(raw: object, name: str) -> structs_pb2.StatValue | None:
    """One statistic of a sample (``{"value": v, "unit": u}``) as Nomad's stat value."""
    if not isinstance(raw, Mapping):
        return None
    value, unit = raw.get("value"), raw.get("unit", "")
    if not isinstance(unit, str) or len(unit) > 16 or not unit.isprintable():
        return None
    known = stats.BY_NAME.get(name)
    stat = structs_pb2.StatValue(unit=unit, desc=known.help if known else "")
    if isinstance(value, bool):
        stat.bool_val.CopyFrom(wrappers_pb2.BoolValue(value=value))
    elif isinstance(value, int) and INT64[0] <= value <= INT64[1]:
        stat.int_numerator_val.CopyFrom(wrappers_pb2.Int64Value(value=value))
    elif isinstance(value, float) and math.isfinite(value):
        stat.float_numerator_val.CopyFrom(wrappers_pb2.DoubleValue(value=value))
    elif isinstance(value, str) and len(value) <= MAX_TEXT and value.isprintable():
        stat.string_val.CopyFrom(wrappers_pb2.StringValue(value=value))
    else:
        return None
    return stat


def _with_denominator(
    numerator: structs_pb2.StatValue, denominator: structs_pb2.StatValue
) -> structs_pb2.StatValue:
    """``numerator`` as a fraction of ``denominator`` (used / total), as Nomad shows memory."""
    fraction = structs_pb2.StatValue()
    fraction.CopyFrom(numerator)
    if numerator.HasField("int_numerator_val") and denominator.HasField("int_numerator_val"):
        fraction.int_denominator_val.value = denominator.int_numerator_val.value
        return fraction
    values = []
    for stat in (numerator, denominator):
        if stat.HasField("int_numerator_val"):
            values.append(float(stat.int_numerator_val.value))
        elif stat.HasField("float_numerator_val"):
            values.append(stat.float_numerator_val.value)
    if len(values) != 2:
        return numerator
    fraction.ClearField("int_numerator_val")
    fraction.float_numerator_val.value, fraction.float_denominator_val.value = values
    return fraction


def device_stats(
    sample: Mapping[str, Any], at: timestamp_pb2.Timestamp
) -> device_pb2.DeviceStats | None:
    """One device's sample (``{NAME: {"value", "unit"}}``) as Nomad's device stats."""
    values: dict[str, structs_pb2.StatValue] = {}
    for name, raw in sample.items():
        if text(name, 128) is None:
            continue
        value = stat_value(raw, name)
        if value is not None:
            values[name] = value
    if not values:
        return None
    for numerator, denominator in FRACTIONS.items():
        if numerator in values and denominator in values:
            values[numerator] = _with_denominator(values[numerator], values[denominator])
    summary = next((values[n] for n in SUMMARY if n in values), None)
    out = device_pb2.DeviceStats(stats=structs_pb2.StatObject(attributes=values), timestamp=at)
    if summary is not None:
        out.summary.CopyFrom(summary)
    return out


def stats_response(sample: object, offer: Offered) -> device_pb2.StatsResponse:
    """A ``stats`` sample (``{"time", "devices": {ID: {NAME: {"value", "unit"}}}}``) for the
    devices offered, grouped as the fingerprint groups them."""
    if not isinstance(sample, Mapping):
        return device_pb2.StatsResponse()
    at = timestamp_pb2.Timestamp()
    moment = sample.get("time")
    if (
        isinstance(moment, int | float)
        and not isinstance(moment, bool)
        and math.isfinite(moment)
        and 0 <= moment < 1e11
    ):
        seconds = math.floor(moment)
        at.seconds, at.nanos = seconds, min(round((moment - seconds) * 1e9), 999_999_999)
    devices = sample.get("devices")
    by_group: dict[Triple, dict[str, device_pb2.DeviceStats]] = {}
    if isinstance(devices, Mapping):
        for device_id, values in devices.items():
            instances = offer.instances(device_id) if isinstance(device_id, str) else []
            if not instances or not isinstance(values, Mapping):
                continue
            converted = device_stats(values, at)
            if converted is None:
                continue
            for instance in instances:
                by_group.setdefault(offer.by_device[instance], {})[instance] = converted
    return device_pb2.StatsResponse(
        groups=[
            device_pb2.DeviceGroupStats(vendor=v, type=t, name=n, instance_stats=instances)
            for (v, t, n), instances in sorted(by_group.items())
        ]
    )


def same(a: Iterable[device_pb2.DeviceGroup], b: Iterable[device_pb2.DeviceGroup]) -> bool:
    """Whether two fingerprints say the same to Nomad (map order aside)."""

    def key(groups: Iterable[device_pb2.DeviceGroup]) -> bytes:
        return device_pb2.FingerprintResponse(device_group=list(groups)).SerializeToString(
            deterministic=True
        )

    return key(a) == key(b)

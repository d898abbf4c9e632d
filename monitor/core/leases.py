"""Leases: who holds which devices on this host, and the JSON form they are kept and shown in.

A lease is plain data. The reducer decides who gets one (``monitor.core.reducer``);
``monitor.outputs.store`` keeps them on disk; ``monitor.sources.holders`` ends those whose holder
process exits. A lease read back from disk is checked field by field as hostile input: a file
anyone could have edited must not crash the daemon, break exclusivity or put a non-number on the
wire.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import attrs

from monitor.core.mig import MIG_UUID
from monitor.core.model import JSON, PCI_ADDRESS, frozen_mapping
from monitor.core.replicas import REPLICA_ID

LEASE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
OWNER = re.compile(r"[a-z0-9._-]{1,64}")  # a scheduler's name: "nomad", "kubelet"
BOOT_ID = re.compile(r"[0-9a-f-]{36}")
MAX_ID = (1 << 32) - 1  # uids, gids
MAX_PID = 1 << 22  # the kernel's PID_MAX_LIMIT
MAX_DEVICES = 1024  # per lease, as per request
MAX_GROUP_KEY = 800  # vendor/type/name, each part bounded where it is made


@attrs.frozen
class Holder:
    """A process, told apart from any later one with the same PID (``monitor.sources.holders``)."""

    pid: int
    start_ticks: int  # clock ticks after boot (/proc/PID/stat field 22)
    boot_id: str


@attrs.frozen
class Lease:
    id: str
    # Device ID (a PCI address, or a replica's ``<address>::<k>``) -> key of the group the
    # device was in when granted, so that a device that
    # leaves the host can still be shown, reserved, in its group.
    devices: Mapping[str, str] = attrs.field(converter=frozen_mapping)
    uid: int  # of the process that asked (SO_PEERCRED), never taken from the request
    gid: int
    pid: int
    created: float  # seconds since the epoch
    holder: Holder | None = None  # the lease ends when this process ends
    connection: int | None = None  # the lease ends when this connection closes; never on disk
    # A scheduler's lease: it ends only by release, by the owner's reconcile, or by an operator.
    owner: str | None = None

    @property
    def device_ids(self) -> tuple[str, ...]:
        return tuple(self.devices)

    @property
    def durable(self) -> bool:
        """Kept on disk: a connection-bound lease ends with the daemon's connections anyway."""
        return self.connection is None

    @property
    def holder_pid(self) -> int | None:
        return self.holder.pid if self.holder is not None else None

    def holder_json(self) -> JSON:
        """Who holds it, as a refused client is told."""
        return {
            "reservation_id": self.id,
            "uid": self.uid,
            "pid": self.pid,
            "holder_pid": self.holder_pid,
            "owner": self.owner,
        }

    def to_json(self) -> JSON:
        """The lease as stored and as ``leases`` shows it (without the connection)."""
        holder = self.holder
        return {
            "reservation_id": self.id,
            "devices": dict(self.devices),
            "uid": self.uid,
            "gid": self.gid,
            "pid": self.pid,
            "created": self.created,
            "holder_pid": holder.pid if holder else None,
            "holder_start": holder.start_ticks if holder else None,
            "holder_boot_id": holder.boot_id if holder else None,
            "owner": self.owner,
        }

    @classmethod
    def from_json(cls, raw: Any) -> Lease:
        """A lease read back from disk; ``ValueError`` naming what is wrong with it."""
        if not isinstance(raw, dict):
            raise ValueError("a lease is not a JSON object")
        lease_id = raw.get("reservation_id")
        if not isinstance(lease_id, str) or not LEASE_ID.fullmatch(lease_id):
            raise ValueError(f"a lease has no valid reservation_id ({_shown(lease_id)})")
        devices = raw.get("devices")
        if not isinstance(devices, dict) or not 0 < len(devices) <= MAX_DEVICES:
            raise ValueError(f"lease {lease_id}: devices is not a map of 1 to {MAX_DEVICES}")
        for device_id, key in devices.items():
            if not is_device_id(device_id):
                raise ValueError(
                    f"lease {lease_id}: {_shown(device_id)} is not a PCI address or replica ID "
                    "(nor a MIG UUID)"
                )
            if not is_group_key(key):
                raise ValueError(f"lease {lease_id}: {_shown(key)} is not a vendor/type/name")
        uid = _integer(raw, "uid", 0, MAX_ID, lease_id)
        gid = _integer(raw, "gid", 0, MAX_ID, lease_id)
        pid = _integer(raw, "pid", 0, MAX_PID, lease_id)
        created: Any = raw.get("created")
        if not _is_number(created) or not math.isfinite(created) or created < 0:
            raise ValueError(f"lease {lease_id}: created is not a time ({_shown(created)})")
        holder = None
        if raw.get("holder_pid") is not None:
            boot = raw.get("holder_boot_id")
            if not isinstance(boot, str) or not BOOT_ID.fullmatch(boot):
                raise ValueError(f"lease {lease_id}: holder_boot_id is not a boot ID")
            holder = Holder(
                _integer(raw, "holder_pid", 1, MAX_PID, lease_id),
                _integer(raw, "holder_start", 0, 1 << 63, lease_id),
                boot,
            )
        owner = raw.get("owner")
        if owner is not None and (not isinstance(owner, str) or not OWNER.fullmatch(owner)):
            raise ValueError(f"lease {lease_id}: owner {_shown(owner)} is not an owner name")
        return cls(
            id=lease_id,
            devices=devices,
            uid=uid,
            gid=gid,
            pid=pid,
            created=float(created),
            holder=holder,
            owner=owner,
        )


def is_device_id(device_id: Any) -> bool:
    """A device ID a lease may hold: a PCI address, replica k of one (``<address>::<k>``), or
    a MIG UUID."""
    return isinstance(device_id, str) and (
        PCI_ADDRESS.fullmatch(device_id) is not None
        or REPLICA_ID.fullmatch(device_id) is not None
        or MIG_UUID.fullmatch(device_id) is not None
    )


def is_group_key(key: Any) -> bool:
    """``vendor/type/name``, each part non-empty and printable (the name may hold slashes)."""
    if not isinstance(key, str) or len(key) > MAX_GROUP_KEY or not key.isprintable():
        return False
    parts = key.split("/", 2)
    return len(parts) == 3 and all(parts)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _integer(raw: dict[str, Any], name: str, low: int, high: int, lease_id: str) -> int:
    value = raw.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"lease {lease_id}: {name} is not an integer from {low} to {high}")
    return value


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@attrs.frozen
class LeaseChange:
    """What a fold did to a lease, and why: what the journal records."""

    kind: str  # "granted", "released" (some or all of its devices) or "ended"
    lease: Lease  # as it was before the change (as granted, for a grant)
    devices: tuple[str, ...]  # the devices it took or gave up
    reason: str  # who or what made the change: "released by uid 1000", "its holder exited"
    by: int | None = None  # the uid that asked for it; None when no one did (its holder exited)

    @property
    def on_account_of(self) -> int:
        """The uid whose doing it is: who asked, else the lease's own user."""
        return self.by if self.by is not None else self.lease.uid

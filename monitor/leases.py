"""Leases: who holds which devices on this host, and the JSON form they are kept and shown in.

A lease is plain data. The reducer decides who gets one (``monitor.reducer``); ``monitor.store``
keeps them on disk; ``monitor.holders`` ends those whose holder process exits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from monitor.model import JSON, frozen_mapping


@attrs.frozen
class Lease:
    id: str
    # PCI address -> key of the group the device was in when granted, so that a device that
    # leaves the host can still be shown, reserved, in its group.
    devices: Mapping[str, str] = attrs.field(converter=frozen_mapping)
    uid: int  # of the process that asked (SO_PEERCRED), never taken from the request
    gid: int
    pid: int
    created: float  # seconds since the epoch
    holder_pid: int | None = None  # the lease ends when this process ends
    holder_start: float | None = None  # its start time, so a reused PID does not count
    connection: int | None = None  # the lease ends when this connection closes; never on disk

    @property
    def device_ids(self) -> tuple[str, ...]:
        return tuple(self.devices)

    @property
    def durable(self) -> bool:
        """Kept on disk: a connection-bound lease ends with the daemon's connections anyway."""
        return self.connection is None

    def holder_json(self) -> JSON:
        """Who holds it, as a refused client is told."""
        return {
            "reservation_id": self.id,
            "uid": self.uid,
            "pid": self.pid,
            "holder_pid": self.holder_pid,
        }

    def to_json(self) -> JSON:
        """The lease as stored and as ``leases`` shows it (without the connection)."""
        return {
            "reservation_id": self.id,
            "devices": dict(self.devices),
            "uid": self.uid,
            "gid": self.gid,
            "pid": self.pid,
            "created": self.created,
            "holder_pid": self.holder_pid,
            "holder_start": self.holder_start,
        }

    @classmethod
    def from_json(cls, raw: Any) -> Lease:
        """A lease read back from disk; ``ValueError`` naming what is wrong with it."""
        if not isinstance(raw, dict):
            raise ValueError("a lease is not a JSON object")
        devices = raw.get("devices")
        if (
            not isinstance(devices, dict)
            or not devices
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in devices.items())
        ):
            raise ValueError("a lease's devices are not a map of device IDs to group keys")
        lease_id = raw.get("reservation_id")
        if not isinstance(lease_id, str) or not lease_id:
            raise ValueError("a lease has no reservation_id")
        numbers = {}
        for name in ("uid", "gid", "pid"):
            value = raw.get(name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"lease {lease_id}: {name} is not an integer")
            numbers[name] = value
        created = raw.get("created")
        holder_pid = raw.get("holder_pid")
        holder_start = raw.get("holder_start")
        if not isinstance(created, int | float) or isinstance(created, bool):
            raise ValueError(f"lease {lease_id}: created is not a number")
        if holder_pid is not None and (
            not isinstance(holder_pid, int) or not isinstance(holder_start, int | float)
        ):
            raise ValueError(f"lease {lease_id}: holder_pid or holder_start is not a number")
        return cls(
            id=lease_id,
            devices=devices,
            created=float(created),
            holder_pid=holder_pid,
            holder_start=None if holder_start is None else float(holder_start),
            **numbers,
        )

"""What the reducer answers a request: a grant, the devices released, or a refusal.

Refusals are domain values with a reason; the serving layer maps each reason to its JSON-RPC
error code. Nothing here knows the wire.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

import attrs

from monitor.core.leases import Lease
from monitor.core.model import Device, DeviceGroup, frozen_mapping, frozen_tuple


class Reason(enum.Enum):
    UNKNOWN_METHOD = "unknown method"
    UNKNOWN_DEVICE = "unknown device"
    UNHEALTHY = "device unhealthy"
    RESERVED = "device already reserved"
    FORBIDDEN = "permission denied"
    INVALID = "invalid request"
    NOT_RECORDED = "not recorded"  # the change could not be made durable


@attrs.frozen
class Refusal:
    reason: Reason
    message: str  # a sentence a person understands
    data: Mapping[str, Any] | None = None  # the devices or leases concerned


@attrs.frozen
class Grant:
    """A lease granted, with the devices as they were when it was decided: what the container
    edits are planned from, whatever the state has become by the time they are."""

    lease: Lease
    devices: tuple[tuple[DeviceGroup, Device], ...] = attrs.field(converter=frozen_tuple)
    nvidia_minors: Mapping[str, int] = attrs.field(converter=frozen_mapping, factory=dict)


@attrs.frozen
class Released:
    released: tuple[str, ...] = attrs.field(converter=frozen_tuple)  # devices no longer held
    not_reserved: tuple[str, ...] = attrs.field(converter=frozen_tuple, factory=tuple)


Answer = Grant | Released | Refusal

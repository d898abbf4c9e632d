"""Time-sliced sharing: a device offered as N replicas, each leased exclusively.

Replica k of a shared device (a PCI device, or a MIG device named by a group rule) has the ID
``<device ID>::<k>`` (DESIGN 3b) and sits in a group of
type ``<type>.shared`` (``nvidia/gpu.shared/NVIDIA H100 80GB HBM3``): a job or pod that asks for
a GPU (``nvidia/gpu``) never gets a time slice without asking for one, and the kubelet's default
resource name (``hotplug-monitor.io/nvidia-gpu.shared``) follows from the type alone.

The policy is plain data from the config: a default count, then rules matched first to last by
PCI IDs (``10de``, ``10de:2330``) or by group (``TYPE``, ``VENDOR/TYPE``, ``VENDOR/TYPE/NAME``).
How many replicas a device has now, given its leases, is ``monitor.core.rules.sharing``'s call.
"""

from __future__ import annotations

import re

import attrs

from monitor.core.model import frozen_tuple

SEPARATOR = "::"
SHARED_SUFFIX = ".shared"
# Each replica is a device in every snapshot and patch: 64 slices of one GPU is already far
# beyond what time-slicing is good for, and keeps a replica ID within DEVICE_ID's 64 characters.
MAX_REPLICAS = 64
REPLICA_ID = re.compile(
    r"(?:[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]"
    r"|MIG-[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})"
    r"::(0|[1-9][0-9]?)"
)
_PCI_IDS = re.compile(r"([0-9a-f]{4})(?::([0-9a-f]{4}))?")


def replica_id(device_id: str, k: int) -> str:
    return f"{device_id}{SEPARATOR}{k}"


def split(device_id: str) -> tuple[str, int | None]:
    """The device a replica is of and its number; ``(device_id, None)`` for a whole device."""
    base, separator, k = device_id.partition(SEPARATOR)
    if separator and k.isdigit():
        return base, int(k)
    return device_id, None


def base_id(device_id: str) -> str:
    """The device itself: what its nodes, minor and health belong to."""
    return split(device_id)[0]


def shared_type(type_: str) -> str:
    return type_ + SHARED_SUFFIX


@attrs.frozen
class ShareRule:
    """``match``: ``VVVV`` or ``VVVV:DDDD`` (hex PCI vendor and device IDs), or a group
    pattern ``TYPE``, ``VENDOR/TYPE`` or ``VENDOR/TYPE/NAME``; ``replicas``: how many (1: not
    shared)."""

    match: str
    replicas: int

    def matches(
        self, vendor_id: int, device_id: int, vendor: str, type_: str, name: str | None
    ) -> bool:
        ids = _PCI_IDS.fullmatch(self.match.lower())
        if ids is not None:
            wanted_device = ids.group(2)
            return int(ids.group(1), 16) == vendor_id and (
                wanted_device is None or int(wanted_device, 16) == device_id
            )
        parts = self.match.split("/", 2)
        if len(parts) == 1:
            return parts[0] == type_
        if len(parts) == 2:
            return (parts[0], parts[1]) == (vendor, type_)
        return (parts[0], parts[1], parts[2]) == (vendor, type_, name)


def check_match(text: str) -> str:
    """``text`` if it is a rule's match, else ``ValueError`` saying what one is."""
    parts = text.split("/", 2)
    if not text or any(not p or not p.isprintable() for p in parts) or len(text) > 256:
        raise ValueError(
            f"match {text!r} is neither PCI IDs (10de or 10de:2330) nor a group "
            "(gpu, nvidia/gpu or nvidia/gpu/NVIDIA H100 80GB HBM3)"
        )
    return text


@attrs.frozen
class SharePolicy:
    replicas: int = 1  # for a device no rule matches
    rules: tuple[ShareRule, ...] = attrs.field(converter=frozen_tuple, default=())
    # Refuse a request for two replicas of one device: it gives no more compute than one.
    fail_requests_greater_than_one: bool = False

    def replicas_for(
        self, vendor_id: int, device_id: int, vendor: str, type_: str, name: str | None
    ) -> int:
        for rule in self.rules:
            if rule.matches(vendor_id, device_id, vendor, type_, name):
                return rule.replicas
        return self.replicas

    def replicas_for_group(self, vendor: str, type_: str, name: str) -> int:
        """The count of a device that only a group rule shares (a MIG device: ``mig``,
        ``nvidia/mig`` or ``nvidia/mig/NAME``); neither PCI IDs nor the default count do, so
        that a MIG instance is time-sliced only where the operator names it."""
        for rule in self.rules:
            if _PCI_IDS.fullmatch(rule.match.lower()) is None and rule.matches(
                0, 0, vendor, type_, name
            ):
                return rule.replicas
        return 1

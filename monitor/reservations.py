"""What a container needs to use a set of devices, per vendor, checked against the current snapshot.

Only paths that exist on this host are listed. The reservation table here is in memory and not
exclusive; exclusive, persistent leases build on the same ``plan`` function.
"""

from __future__ import annotations

import itertools
import os
import secrets
import time
from collections.abc import Callable, Iterable

import attrs

from monitor.model import ContainerReservation, Device, DeviceGroup, DeviceSpec, Fingerprint
from monitor.protocol import DEVICE_UNHEALTHY, INVALID_PARAMS, UNKNOWN_DEVICE, RpcError

NVIDIA_CONTROL_NODES = (
    "/dev/nvidiactl",
    "/dev/nvidia-uvm",
    "/dev/nvidia-uvm-tools",
    "/dev/nvidia-modeset",
)
AMD_KFD = "/dev/kfd"
MAX_DEVICES_PER_REQUEST = 1024

Exists = Callable[[str], bool]
NODE_CHECK_SECONDS = 1.0


class RecentNodeCheck:
    """``os.path.exists`` for vendor device nodes, each answer kept for a second.

    Drivers make those nodes when they load (``/dev/nvidia-uvm`` often only at first CUDA use),
    not per request, while a stat of each node on every request was a quarter of what a
    reservation cost (tests/bench, scenario 5).
    """

    def __init__(
        self,
        check: Exists = os.path.exists,
        clock: Callable[[], float] = time.monotonic,
        seconds: float = NODE_CHECK_SECONDS,
    ) -> None:
        self._check = check
        self._clock = clock
        self._seconds = seconds
        self._answers: dict[str, tuple[bool, float]] = {}

    def __call__(self, path: str) -> bool:
        now = self._clock()
        answer = self._answers.get(path)
        if answer is None or now >= answer[1]:
            answer = (self._check(path), now + self._seconds)
            self._answers[path] = answer
        return answer[0]


def device_index(fingerprint: Fingerprint) -> dict[str, tuple[DeviceGroup, Device]]:
    """Every device by PCI address and, where it has one, by GPU UUID."""
    index = fingerprint.devices()
    for group, device in list(index.values()):
        uuid_attribute = device.attributes.get("uuid")
        if uuid_attribute is not None:
            index[str(uuid_attribute.value)] = (group, device)
    return index


def resolve(fingerprint: Fingerprint, ids: Iterable[str]) -> list[tuple[DeviceGroup, Device]]:
    """Find devices by PCI address or by GPU UUID; unknown IDs raise -32001 naming them all."""
    index = device_index(fingerprint)
    found, unknown = [], []
    for wanted in ids:
        hit = index.get(wanted) or index.get(wanted.lower())
        if hit is None:
            unknown.append(wanted)
        elif hit not in found:
            found.append(hit)
    if unknown:
        raise RpcError(
            UNKNOWN_DEVICE,
            f"No such device on this host: {', '.join(unknown)}.",
            {"device_ids": unknown},
        )
    return found


def _drm_nodes(device: Device) -> list[str]:
    paths = []
    for name in ("drm_card", "drm_render"):
        attribute = device.attributes.get(name)
        if attribute is not None:
            paths.extend(str(attribute.value).split(","))
    return paths


def plan(
    devices: list[tuple[DeviceGroup, Device]],
    *,
    minor_of: Callable[[str], int | None],
    exists: Exists = os.path.exists,
) -> ContainerReservation:
    """The env vars and device nodes for these devices; refuses unhealthy ones with -32002."""
    unhealthy = {d.id: d.health_desc for _, d in devices if not d.healthy}
    if unhealthy:
        names = "; ".join(f"{i}: {desc}" for i, desc in unhealthy.items())
        raise RpcError(
            DEVICE_UNHEALTHY,
            f"Refusing unhealthy devices ({names}).",
            {"device_ids": list(unhealthy), "health": unhealthy},
        )
    vendor_nodes: list[str] = []  # made by drivers outside udev's view: checked on disk
    drm_nodes: list[str] = []  # the kernel reported them with the device: they exist
    visible_gpus: list[str] = []
    for group, device in devices:
        if group.vendor == "nvidia":
            uuid_attribute = device.attributes.get("uuid")
            visible_gpus.append(str(uuid_attribute.value) if uuid_attribute else device.id)
            minor = minor_of(device.id)
            if minor is not None:
                vendor_nodes.append(f"/dev/nvidia{minor}")
            vendor_nodes.extend(NVIDIA_CONTROL_NODES)
        elif group.vendor == "amd":
            vendor_nodes.append(AMD_KFD)
        drm_nodes.extend(_drm_nodes(device))
    envs = {"NVIDIA_VISIBLE_DEVICES": ",".join(visible_gpus)} if visible_gpus else {}
    unique = [n for n in dict.fromkeys(vendor_nodes) if exists(n)] + drm_nodes
    return ContainerReservation(
        envs=envs,
        devices=[DeviceSpec(task_path=n, host_path=n, cgroup_perms="rwm") for n in unique],
    )


@attrs.frozen
class Reservation:
    id: str
    device_ids: tuple[str, ...]


class ReservationTable:
    """Reservations made through this daemon since it started, by ID."""

    def __init__(self) -> None:
        self._by_id: dict[str, Reservation] = {}
        # IDs unique across restarts without a random read per reservation.
        self._prefix = secrets.token_hex(6)
        self._serial = itertools.count(1)

    def __len__(self) -> int:
        return len(self._by_id)

    def add(self, device_ids: list[str]) -> Reservation:
        reservation = Reservation(
            id=f"{self._prefix}-{next(self._serial)}", device_ids=tuple(device_ids)
        )
        self._by_id[reservation.id] = reservation
        return reservation

    def release_by_id(self, reservation_id: str) -> list[str]:
        reservation = self._by_id.pop(reservation_id, None)
        if reservation is None:
            raise RpcError(
                INVALID_PARAMS,
                f"No reservation {reservation_id} is held.",
                {"reservation_id": reservation_id},
            )
        return list(reservation.device_ids)

    def release_devices(self, device_ids: list[str]) -> list[str]:
        """Take these devices out of the reservations holding them; the ones that were held."""
        wanted = set(device_ids)
        released: list[str] = []
        for reservation in list(self._by_id.values()):
            kept = tuple(d for d in reservation.device_ids if d not in wanted)
            if len(kept) == len(reservation.device_ids):
                continue
            released.extend(d for d in reservation.device_ids if d in wanted and d not in released)
            if kept:
                self._by_id[reservation.id] = attrs.evolve(reservation, device_ids=kept)
            else:
                del self._by_id[reservation.id]
        return released

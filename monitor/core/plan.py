"""What a container needs to use a set of devices, per vendor, checked against the current snapshot.

Only paths that exist on this host are listed. Who may hold which device is the reducer's
decision (leases); this module finds devices and lists their container edits.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable

from monitor.core.model import (
    ContainerReservation,
    Device,
    DeviceGroup,
    DeviceSpec,
    Fingerprint,
    Mount,
)
from monitor.wire.protocol import DEVICE_UNHEALTHY, UNKNOWN_DEVICE, RpcError

NVIDIA_CONTROL_NODES = (
    "/dev/nvidiactl",
    "/dev/nvidia-uvm",
    "/dev/nvidia-uvm-tools",
    "/dev/nvidia-modeset",
)
AMD_KFD = "/dev/kfd"
BY_PATH = "/dev/dri/by-path"
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


def check_healthy(devices: list[tuple[DeviceGroup, Device]]) -> None:
    """Refuse unhealthy devices with -32002, naming each and why."""
    unhealthy = {d.id: d.health_desc for _, d in devices if not d.healthy}
    if unhealthy:
        names = "; ".join(f"{i}: {desc}" for i, desc in unhealthy.items())
        raise RpcError(
            DEVICE_UNHEALTHY,
            f"Refusing unhealthy devices ({names}).",
            {"device_ids": list(unhealthy), "health": unhealthy},
        )


def by_path_links(address: str, exists: Exists) -> list[str]:
    """udev's stable names for a device's DRM nodes, where udev made them."""
    return [
        link
        for link in (f"{BY_PATH}/pci-{address}-card", f"{BY_PATH}/pci-{address}-render")
        if exists(link)
    ]


def plan(
    devices: list[tuple[DeviceGroup, Device]],
    *,
    minor_of: Callable[[str], int | None],
    exists: Exists = os.path.exists,
) -> ContainerReservation:
    """The env vars, device nodes and mounts that let a container use these devices."""
    vendor_nodes: list[str] = []  # made by drivers outside udev's view: checked on disk
    drm_nodes: list[str] = []  # the kernel reported them with the device: they exist
    links: list[str] = []
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
        nodes = _drm_nodes(device)
        drm_nodes.extend(nodes)
        if nodes:
            links.extend(by_path_links(device.id, exists))
    envs = {"NVIDIA_VISIBLE_DEVICES": ",".join(visible_gpus)} if visible_gpus else {}
    unique = [n for n in dict.fromkeys(vendor_nodes) if exists(n)] + drm_nodes
    return ContainerReservation(
        envs=envs,
        mounts=[Mount(task_path=link, host_path=link, read_only=True) for link in links],
        devices=[DeviceSpec(task_path=n, host_path=n, cgroup_perms="rwm") for n in unique],
    )

"""What a container needs to use a set of devices, per vendor: the plan of its edits.

Only paths that exist on this host are listed; whether one exists is asked of the caller
(``exists``), which does the looking. Who may hold which device is the leasing rules' decision.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from monitor.core.model import (
    ContainerReservation,
    Device,
    DeviceGroup,
    DeviceSpec,
    Mount,
)
from monitor.core.replicas import base_id

NVIDIA_CONTROL_NODES = (
    "/dev/nvidiactl",
    "/dev/nvidia-uvm",
    "/dev/nvidia-uvm-tools",
    "/dev/nvidia-modeset",
)
AMD_KFD = "/dev/kfd"
BY_PATH = "/dev/dri/by-path"

Exists = Callable[[str], bool]


def _drm_nodes(device: Device) -> list[str]:
    paths = []
    for name in ("drm_card", "drm_render"):
        attribute = device.attributes.get(name)
        if attribute is not None:
            paths.extend(str(attribute.value).split(","))
    return paths


def by_path_links(address: str, exists: Exists) -> list[str]:
    """udev's stable names for a device's DRM nodes, where udev made them."""
    return [
        link
        for link in (f"{BY_PATH}/pci-{address}-card", f"{BY_PATH}/pci-{address}-render")
        if exists(link)
    ]


def _mig_caps(device: Device) -> list[str]:
    """A MIG device's capability nodes (its GPU instance's, its compute instance's)."""
    caps = device.attributes.get("mig_caps")
    return str(caps.value).split(",") if caps is not None else []


def plan(
    devices: Iterable[tuple[DeviceGroup, Device]],
    *,
    minor_of: Callable[[str], int | None],
    exists: Exists,
) -> ContainerReservation:
    """The env vars, device nodes and mounts that let a container use these devices; ``exists``
    says which of the nodes drivers make outside udev's view are there. A replica of a shared
    device gets its device's edits (``minor_of`` is asked for the device), and two replicas of
    one device give them once. A MIG device is named by its MIG UUID, and gets its GPU's node
    and its own capability nodes (``/dev/nvidia-caps/nvidia-capN``)."""
    vendor_nodes: list[str] = []  # made by drivers outside udev's view: checked on disk
    drm_nodes: list[str] = []  # the kernel reported them with the device: they exist
    links: list[str] = []
    visible_gpus: list[str] = []
    for group, device in devices:
        address = device.hw_locality.pci_bus_id or base_id(device.id)  # a MIG device's GPU's
        if group.vendor == "nvidia":
            uuid_attribute = device.attributes.get("uuid")
            visible_gpus.append(str(uuid_attribute.value) if uuid_attribute else address)
            minor = minor_of(address)
            if minor is not None:
                vendor_nodes.append(f"/dev/nvidia{minor}")
            vendor_nodes.extend(NVIDIA_CONTROL_NODES)
            vendor_nodes.extend(_mig_caps(device))
        elif group.vendor == "amd":
            vendor_nodes.append(AMD_KFD)
        nodes = _drm_nodes(device)
        drm_nodes.extend(nodes)
        if nodes:
            links.extend(by_path_links(address, exists))
    visible_gpus, drm_nodes, links = (
        list(dict.fromkeys(x)) for x in (visible_gpus, drm_nodes, links)
    )
    envs = {"NVIDIA_VISIBLE_DEVICES": ",".join(visible_gpus)} if visible_gpus else {}
    unique = [n for n in dict.fromkeys(vendor_nodes) if exists(n)] + drm_nodes
    return ContainerReservation(
        envs=envs,
        mounts=[Mount(task_path=link, host_path=link, read_only=True) for link in links],
        devices=[DeviceSpec(task_path=n, host_path=n, cgroup_perms="rwm") for n in unique],
    )


def vendor_nodes(nvidia_minors: Iterable[int]) -> list[str]:
    """Every node made by drivers outside udev's view that ``plan`` may list, for GPUs with these
    NVIDIA minors: what the edge checks on disk when a rule must know (a reserve for CDI)."""
    return [*(f"/dev/nvidia{m}" for m in nvidia_minors), *NVIDIA_CONTROL_NODES, AMD_KFD]


def with_edits(
    devices: Iterable[tuple[DeviceGroup, Device]],
    *,
    minor_of: Callable[[str], int | None],
    exists: Exists,
) -> list[str]:
    """The IDs of the devices that have something of their own to inject: those a CDI spec has
    an entry for, since a container engine refuses a whole spec for one empty entry."""
    return [
        device.id
        for group, device in devices
        if not plan([(group, device)], minor_of=minor_of, exists=exists).empty
    ]

"""Devices, peers and helpers the pure tests of the core share."""

from __future__ import annotations

import itertools
from typing import Any

import attrs

from monitor.core.access import Access, Peer
from monitor.core.events import (
    DrmNode,
    Event,
    NvmlGpu,
    PciFacts,
    ReleaseRequested,
    ReserveRequested,
)
from monitor.core.leases import Holder
from monitor.core.reducer import Reduction, fold
from monitor.core.state import State

H100 = PciFacts(
    address="0000:3b:00.0",
    vendor_id=0x10DE,
    device_id=0x2330,
    pci_class=0x030200,
    subsystem_vendor_id=0x10DE,
    subsystem_device_id=0x16C1,
    driver="nvidia",
    model="H100 SXM5 80GB",
    numa_node=1,
    link_speed="32.0 GT/s PCIe",
    link_width=16,
)
H100_B = attrs.evolve(H100, address="0000:5e:00.0", numa_node=0)
CARD = DrmNode(name="card1", parent=H100.address, devnode="/dev/dri/card1")
RENDER = DrmNode(name="renderD129", parent=H100.address, devnode="/dev/dri/renderD129")
NIC = PciFacts(address="0000:01:00.0", vendor_id=0x8086, device_id=0x1592, pci_class=0x020000)
GROUP = "nvidia/gpu/H100 SXM5 80GB"
NVML_NAME = "NVIDIA H100 80GB HBM3"
NVML_GROUP = f"nvidia/gpu/{NVML_NAME}"
GPU_UUID = "GPU-0a0a0a0a-1111-2222-3333-444444444444"
GPU = NvmlGpu(address=H100.address, uuid=GPU_UUID, name=NVML_NAME, minor=5)

GROUP_ID = 4242
ROOT = Peer(pid=1, uid=0, gid=0)
MEMBER = Peer(pid=100, uid=1000, gid=1000, groups=frozenset({GROUP_ID}))
OTHER_MEMBER = Peer(pid=101, uid=1001, gid=GROUP_ID)
OUTSIDER = Peer(pid=102, uid=1002, gid=1002)
IN_A_CONTAINER = attrs.evolve(MEMBER, in_our_pid_namespace=False)
ACCESS = Access(gid=GROUP_ID, own_uid=0)
HOLDER = Holder(pid=4000, start_ticks=123456, boot_id="5d1e3a4b-0000-4000-8000-000000000000")

_tokens = itertools.count(1)


def reserve(
    *device_ids: str, peer: Peer = MEMBER, lease_id: str = "lease-1", **more: Any
) -> ReserveRequested:
    return ReserveRequested(next(_tokens), peer, device_ids, lease_id=lease_id, created=1.0, **more)


def release(
    *device_ids: str, peer: Peer = MEMBER, lease_id: str | None = None, owner: str | None = None
) -> ReleaseRequested:
    return ReleaseRequested(
        next(_tokens), peer, lease_id=lease_id, device_ids=device_ids, owner=owner
    )


def run(*events: Event, state: State | None = None) -> tuple[State, list[dict[str, Any] | None]]:
    """Each event folded on its own, in order: the last state and every patch."""
    state = state or State(access=ACCESS)
    patches = []
    for event in events:
        reduction = fold(state, [event])
        state = reduction.state
        patches.append(reduction.patch)
    return state, patches


def decide(state: State, *events: Event) -> Reduction:
    """One fold of these events on ``state``."""
    return fold(state, events)


def device_json(state: State, address: str) -> dict[str, Any]:
    for group in state.fingerprint.to_json()["groups"].values():
        if address in group["devices"]:
            device: dict[str, Any] = group["devices"][address]
            return device
    raise KeyError(address)


def group_of(state: State, address: str) -> str | None:
    for key, group in state.fingerprint.groups.items():
        if address in group.devices:
            return key
    return None

"""The state: what the sources reported, the leases, and the fingerprint derived from them.

Frozen: only a fold (``monitor.core.reducer``) makes a new one, through a draft
(``monitor.core.draft``). Each field's metadata says which devices a change of one of its entries
touches, so that the draft knows whose part of the fingerprint to build again without any rule
having to say so. A field without that metadata is not a fact (the generation) or is derived
(the fingerprint).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from monitor.core.access import Access
from monitor.core.conditions import HealthPolicy
from monitor.core.events import DrmNode, NvmlGpu, PciFacts
from monitor.core.health import Problems, frozen_problems
from monitor.core.leases import Lease
from monitor.core.mig import MigInstance, MigLayout, MigMinors
from monitor.core.model import Fingerprint, frozen_mapping, frozen_tuple
from monitor.core.pci import DEFAULT_MATCH_CLASSES
from monitor.core.replicas import SharePolicy, base_id
from monitor.core.witnesses import Sighting
from monitor.core.xids import XidPolicy

# What an entry touches: the devices whose fingerprint a change of it changes.
Touches = Callable[[Any, Any], Iterable[str]]
TOUCHES = "touches"
EVERY_DEVICE = "every device"  # a change of the field changes what any device looks like
NO_DEVICE = "no device"  # shown through other fields (the XID policy, through problems)


def _the_key(address: str, _: object) -> Iterable[str]:
    return (address,)


def _the_parent(_: str, node: DrmNode) -> Iterable[str]:
    return (node.parent,)


def _the_devices(_: str, lease: Lease) -> Iterable[str]:
    # and a replica's device, which its replicas are built with
    return {*lease.devices, *(base_id(d) for d in lease.devices)}


def _the_instances(address: str, layout: MigLayout) -> Iterable[str]:
    return (address, *(i.uuid for i in layout.instances))


def _by_device(touches: Touches = _the_key) -> dict[str, Any]:
    return {TOUCHES: touches}


@attrs.frozen
class State:
    generation: int = 0  # grows with each patch
    match_classes: tuple[str, ...] = attrs.field(
        default=DEFAULT_MATCH_CLASSES, converter=frozen_tuple, metadata={TOUCHES: EVERY_DEVICE}
    )
    devices: Mapping[str, PciFacts] = attrs.field(
        converter=frozen_mapping, factory=dict, metadata=_by_device()
    )
    drm_nodes: Mapping[str, DrmNode] = attrs.field(
        converter=frozen_mapping, factory=dict, metadata=_by_device(_the_parent)
    )
    problems: Mapping[str, Problems] = attrs.field(
        converter=frozen_problems, factory=dict, metadata=_by_device()
    )
    leases: Mapping[str, Lease] = attrs.field(
        converter=frozen_mapping, factory=dict, metadata=_by_device(_the_devices)
    )
    nvml: Mapping[str, NvmlGpu] = attrs.field(
        converter=frozen_mapping, factory=dict, metadata=_by_device()
    )
    xids: Mapping[str, tuple[int, int]] = attrs.field(  # address -> (last XID, count)
        converter=frozen_mapping, factory=dict, metadata=_by_device()
    )
    # Which source reported each device's last counted XID ("nvml", "kmsg"), shown beside it.
    xid_sources: Mapping[str, str] = attrs.field(
        converter=frozen_mapping, factory=dict, metadata=_by_device()
    )
    # The XIDs counted lately, so that the other source's report of one counts once
    # (monitor.core.witnesses); bounded, and shown through xids alone.
    xid_sightings: tuple[Sighting, ...] = attrs.field(
        converter=frozen_tuple, default=(), metadata={TOUCHES: NO_DEVICE}
    )
    # The group name of each device, fixed for as long as it stays bound to one driver, so that
    # its group does not depend on which source answered first.
    names: Mapping[str, str] = attrs.field(
        converter=frozen_mapping, factory=dict, metadata=_by_device()
    )
    # NVIDIA GPUs bound to nvidia that wait for NVML's name before they are shown: the number of
    # each wait, so that a wait's end is not taken for a later one's.
    naming: Mapping[str, int] = attrs.field(
        converter=frozen_mapping, factory=dict, metadata=_by_device()
    )
    waits: int = attrs.field(default=0, metadata={TOUCHES: NO_DEVICE})  # waits begun so far
    # PCI error recoveries the kernel reported per device: after one, NVML reads a GPU afresh.
    resets: Mapping[str, int] = attrs.field(
        converter=frozen_mapping, factory=dict, metadata={TOUCHES: NO_DEVICE}
    )
    nvml_names: bool = attrs.field(default=False, metadata={TOUCHES: NO_DEVICE})  # NVML names
    xid_policy: XidPolicy = attrs.field(factory=XidPolicy, metadata={TOUCHES: NO_DEVICE})
    # The health conditions NVML reports per GPU (name -> what was found), and how they count.
    conditions: Mapping[str, Mapping[str, str]] = attrs.field(
        converter=frozen_mapping, factory=dict, metadata=_by_device()
    )
    health_policy: HealthPolicy = attrs.field(
        factory=HealthPolicy, metadata={TOUCHES: EVERY_DEVICE}
    )
    access: Access = attrs.field(factory=Access, metadata={TOUCHES: NO_DEVICE})
    # Time-sliced sharing: the configured policy, and the replica count in effect per shared
    # device (absent: not shared), which follows the policy except while leases hold it
    # (``monitor.core.rules.sharing``).
    share: SharePolicy = attrs.field(factory=SharePolicy, metadata={TOUCHES: NO_DEVICE})
    replicas: Mapping[str, int] = attrs.field(
        converter=frozen_mapping, factory=dict, metadata=_by_device()
    )
    # MIG: each NVIDIA GPU's MIG mode and MIG devices as NVML last showed them, and the
    # driver's capability minors (``monitor.core.rules.mig``).
    mig: Mapping[str, MigLayout] = attrs.field(
        converter=frozen_mapping, factory=dict, metadata=_by_device(_the_instances)
    )
    mig_minors: MigMinors = attrs.field(factory=MigMinors, metadata={TOUCHES: EVERY_DEVICE})
    fingerprint: Fingerprint = attrs.field(factory=Fingerprint)

    def nvidia_minor(self, address: str) -> int | None:
        return nvidia_minor(self.devices, self.nvml, address)

    def mig_instance(self, device_id: str) -> tuple[str, MigInstance] | None:
        """The GPU (PCI address) and MIG device a MIG UUID names now, if it names one."""
        if not device_id.startswith("MIG-"):
            return None
        for address, layout in self.mig.items():
            found = layout.find(device_id)
            if found is not None:
                return address, found
        return None

    def parent_of(self, device_id: str) -> str:
        """The PCI address of the device an ID is of: a replica's device, a MIG device's GPU
        (the ID itself for a MIG device no GPU has now)."""
        found = self.mig_instance(device_id)
        return found[0] if found is not None else base_id(device_id)

    def mig_instances(self, address: str) -> tuple[MigInstance, ...]:
        """The GPU's MIG devices now (none unless MIG mode is on and instances exist)."""
        layout = self.mig.get(address)
        return layout.instances if layout is not None and layout.enabled else ()


F = attrs.fields(State)  # the fields by name, for the rules: ``draft.get(F.devices)``


def nvidia_minor(
    devices: Mapping[str, PciFacts], nvml: Mapping[str, NvmlGpu], address: str
) -> int | None:
    """N of the GPU's /dev/nvidiaN: the driver's proc file says, else NVML, else unknown."""
    facts = devices.get(address)
    if facts is not None and facts.nvidia_minor is not None:
        return facts.nvidia_minor
    gpu = nvml.get(address)
    return gpu.minor if gpu is not None else None

"""A MIG device as the fingerprint shows it: its own ID, group, attributes and health.

Its health is its GPU's (a GPU-wide XID or condition breaks every instance) together with its
own problems (``State.problems`` under its MIG UUID); its XID count is its own, for the XIDs
NVML attributes to it (``monitor.core.rules.mig.instance_scoped``).
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from monitor.core.health import HEALTHY, NEEDS_RESET, UNHEALTHY, Problems
from monitor.core.leases import Lease
from monitor.core.mig import MIG_TYPE, MigInstance, MigMinors
from monitor.core.model import Attribute, Device, DeviceLocality
from monitor.core.xids import xid_action

# What an instance copies of its GPU's attributes: where it is, and what software sees.
COPIED = ("numa_node", "driver_version", "cuda_compute_capability")


def group_name(gpu_name: str, instance: MigInstance) -> str:
    """``NVIDIA H100 80GB HBM3 MIG 1g.10gb``: the GPU's name and the profile."""
    return f"{gpu_name} MIG {instance.profile}"


def mig_group(vendor: str, gpu_name: str, instance: MigInstance) -> tuple[str, str, str]:
    return vendor, MIG_TYPE, group_name(gpu_name, instance)


def cap_nodes(minors: MigMinors, gpu_minor: int | None, instance: MigInstance) -> list[str] | None:
    """The instance's /dev/nvidia-caps nodes (GPU instance access, then compute instance
    access), or None where the GPU's minor or the mig-minors entries are not known."""
    if gpu_minor is None:
        return None
    return minors.nodes(gpu_minor, instance.gpu_instance_id, instance.compute_instance_id)


def instance_device(
    parent: Device,
    instance: MigInstance,
    *,
    caps: list[str] | None,
    problems: Problems,
    xids: tuple[int, int] | None,
    xid_source: str | None,
    lease: Lease | None,
    before: Device | None,
) -> Device:
    """MIG device ``instance`` of the GPU ``parent`` (as built whole)."""
    attributes: dict[str, Attribute] = {
        "uuid": Attribute(instance.uuid),
        "mig_profile": Attribute(instance.profile),
        "memory": Attribute(instance.memory_mib, "MiB"),
        "gpu_slices": Attribute(instance.gpu_slices),
        "compute_slices": Attribute(instance.compute_slices),
        "gpu_instance_id": Attribute(instance.gpu_instance_id),
        "compute_instance_id": Attribute(instance.compute_instance_id),
        "parent_pci_bus_id": Attribute(parent.id),
    }
    parent_uuid = parent.attributes.get("uuid")
    if parent_uuid is not None:
        attributes["parent_uuid"] = parent_uuid
    for name in COPIED:
        if name in parent.attributes:
            attributes[name] = parent.attributes[name]
    if caps:
        attributes["mig_caps"] = Attribute(",".join(caps))
    if xids is not None:
        attributes["last_xid"] = Attribute(xids[0])
        attributes["xid_count"] = Attribute(xids[1])
        attributes["last_xid_action"] = Attribute(xid_action(xids[0]))
        if xid_source:
            attributes["last_xid_source"] = Attribute(xid_source)
    shown: Mapping[str, Attribute] = attributes
    if before is not None and before.attributes == attributes:
        shown = before.attributes
    own = [problems[cause] for cause in sorted(problems)]
    descs = [d for d in (parent.health_desc, *(p.desc for p in own)) if d]
    healths = [parent.health or HEALTHY, *(p.health for p in own)]
    if all(h == HEALTHY for h in healths):
        health = None
    elif all(h in (HEALTHY, NEEDS_RESET) for h in healths):
        health = NEEDS_RESET
    else:
        health = UNHEALTHY
    return attrs.evolve(
        parent,
        id=instance.uuid,
        healthy=parent.healthy and not own,
        health_desc="; ".join(descs),
        hw_locality=DeviceLocality(pci_bus_id=parent.id),
        attributes=shown,
        reserved_by=lease.id if lease else None,
        reserved_owner=lease.owner if lease else None,
        health=health,
    )

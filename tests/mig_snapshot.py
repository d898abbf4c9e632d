"""A daemon snapshot with MIG instances, written by hand from the snapshot contract (docs/mig.md):
what the adapters' pure tests translate, without a daemon.

Each instance is a device whose ID is its MIG UUID, in a group ``nvidia/mig/<GPU name> MIG
<profile>``, its PCI address (``hw_locality``) its GPU's, which several instances share; the GPU
itself is not a device of the snapshot while it has instances.
"""

from __future__ import annotations

from typing import Any

H100 = "NVIDIA H100 80GB HBM3"
GPU_A, GPU_B = "0000:3b:00.0", "0000:86:00.0"  # two split GPUs, on NUMA nodes 0 and 1
WHOLE = "0000:3c:00.0"  # a GPU not split: a device of its own
PARENT = {
    GPU_A: "GPU-0a0a0a0a-1111-2222-3333-444444444444",
    GPU_B: "GPU-0b0b0b0b-1111-2222-3333-444444444444",
}
NUMA = {GPU_A: 0, GPU_B: 1, WHOLE: 0}
# Instance MIG UUIDs: GPU A has two 1g.10gb and one 3g.40gb, GPU B two 1g.10gb.
A1, A2, A3 = (f"MIG-a{k}a{k}a{k}a{k}-0000-4000-8000-00000000000{k}" for k in (1, 2, 3))
B1, B2 = (f"MIG-b{k}b{k}b{k}b{k}-0000-4000-8000-00000000000{k}" for k in (1, 2))
# profile -> (memory MiB, GPU slices, compute slices), as an H100 80GB reports them
PROFILES = {"1g.10gb": (9856, 1, 1), "3g.40gb": (40192, 3, 3), "1g.10gb+me": (9856, 1, 1)}


def group_name(profile: str, gpu_name: str = H100) -> str:
    return f"{gpu_name} MIG {profile}"


def attribute(value: Any, unit: str | None = None) -> dict[str, Any]:
    return {"value": value} if unit is None else {"value": value, "unit": unit}


def instance(
    mig_uuid: str,
    gpu: str,
    profile: str,
    gi: int,
    ci: int = 0,
    *,
    healthy: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """One MIG instance as the daemon shows it."""
    memory, gpu_slices, compute_slices = PROFILES[profile]
    return {
        "id": mig_uuid,
        "healthy": healthy,
        "health_desc": "" if healthy else "XID 79: GPU has fallen off the bus",
        "hw_locality": {"pci_bus_id": gpu},
        "attributes": {
            "mig_profile": attribute(profile),
            "memory": attribute(memory, "MiB"),
            "gpu_slices": attribute(gpu_slices),
            "compute_slices": attribute(compute_slices),
            "gpu_instance_id": attribute(gi),
            "compute_instance_id": attribute(ci),
            "parent_uuid": attribute(PARENT[gpu]),
            "parent_pci_bus_id": attribute(gpu),
            "numa_node": attribute(NUMA[gpu]),
        },
        **extra,
    }


def whole_gpu(address: str = WHOLE, **extra: Any) -> dict[str, Any]:
    """A GPU not split into instances, as the daemon shows one today."""
    return {
        "id": address,
        "healthy": True,
        "health_desc": "",
        "hw_locality": {"pci_bus_id": address},
        "attributes": {
            "uuid": attribute("GPU-" + address.replace(":", "").replace(".", "")),
            "numa_node": attribute(NUMA[address]),
            "memory": attribute(81559, "MiB"),
        },
        **extra,
    }


def group(
    vendor: str, type_: str, name: str, devices: list[dict[str, Any]]
) -> tuple[str, dict[str, Any]]:
    return f"{vendor}/{type_}/{name}", {
        "vendor": vendor,
        "type": type_,
        "name": name,
        "attributes": {},
        "devices": {d["id"]: d for d in devices},
    }


def snapshot(*groups: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    return {"groups": dict(groups)}


def mig_groups(
    a: dict[str, dict[str, Any]] | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """GPU A's and B's instances, one group a profile; ``a`` replaces instances by ID."""
    a = a or {}
    small = [
        a.get(A1, instance(A1, GPU_A, "1g.10gb", 9)),
        a.get(A2, instance(A2, GPU_A, "1g.10gb", 10)),
        instance(B1, GPU_B, "1g.10gb", 9),
        instance(B2, GPU_B, "1g.10gb", 10),
    ]
    large = [a.get(A3, instance(A3, GPU_A, "3g.40gb", 2))]
    return [
        group("nvidia", "mig", group_name("1g.10gb"), small),
        group("nvidia", "mig", group_name("3g.40gb"), large),
    ]


def split_node(replace: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Both GPUs split (1g.10gb and 3g.40gb), and one whole GPU beside them; ``replace``
    replaces GPU A's instances by ID."""
    return snapshot(*mig_groups(replace), group("nvidia", "gpu", H100, [whole_gpu()]))


def one_profile_node() -> dict[str, Any]:
    """Every GPU split into 1g.10gb instances alone, no whole GPU: what ``single`` fits."""
    small = [
        instance(A1, GPU_A, "1g.10gb", 9),
        instance(A2, GPU_A, "1g.10gb", 10),
        instance(B1, GPU_B, "1g.10gb", 9),
    ]
    return snapshot(group("nvidia", "mig", group_name("1g.10gb"), small))

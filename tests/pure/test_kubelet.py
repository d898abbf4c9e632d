"""The kubelet plugin's decisions by plain calls: its options and resource naming, the snapshot
as per-resource device lists with health and NUMA nodes, GetPreferredAllocation, reconcile's
device set, and the Allocate answer built from a reservation."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from monitor.adapters.kubelet import options as opts
from monitor.adapters.kubelet.inventory import (
    UNREACHABLE,
    Inventory,
    KubeDevice,
    inventory,
    unreachable,
)
from monitor.adapters.kubelet.options import OptionError, Options, build, default_resource
from monitor.adapters.kubelet.preferred import distance, preferred
from monitor.adapters.kubelet.protos import podresources_v1_pb2 as pr
from monitor.adapters.kubelet.reconcile import in_use, still_used
from monitor.adapters.kubelet.rpc import container_response, list_response

A, B, C, D = "0000:3b:00.0", "0000:3c:00.0", "0000:86:00.0", "0000:87:00.0"
UUID_A = "GPU-0a0a0a0a-1111-2222-3333-444444444444"
H100 = "NVIDIA H100 80GB HBM3"
NVIDIA = "hotplug-monitor.io/nvidia-gpu"


def uuid(address: str) -> str:
    return "GPU-" + address.replace(":", "").replace(".", "")


def device(address: str, numa: int | None = 0, **extra: Any) -> dict[str, Any]:
    attributes: dict[str, Any] = {"uuid": {"value": uuid(address)}}
    if numa is not None:
        attributes["numa_node"] = {"value": numa}
    return {
        "id": address,
        "healthy": True,
        "health_desc": "",
        "hw_locality": {"pci_bus_id": address},
        "attributes": attributes,
        **extra,
    }


def snapshot(*groups: tuple[str, str, str, list[dict[str, Any]]]) -> dict[str, Any]:
    return {
        "groups": {
            f"{v}/{t}/{n}": {
                "vendor": v,
                "type": t,
                "name": n,
                "attributes": {},
                "devices": {d["id"]: d for d in devices},
            }
            for v, t, n, devices in groups
        }
    }


# --- options and naming ------------------------------------------------------------------


def test_default_resource_names_per_vendor_and_type_never_nvidias_own() -> None:
    assert default_resource("nvidia", "gpu") == NVIDIA
    assert default_resource("amd", "gpu") == "hotplug-monitor.io/amd-gpu"
    assert default_resource("intel", "accelerator") == "hotplug-monitor.io/intel-accelerator"
    assert default_resource("0x1ed5", "accelerator") == "hotplug-monitor.io/0x1ed5-accelerator"
    assert default_resource("Odd Vendor!", "gpu") == "hotplug-monitor.io/odd-vendor-gpu"
    assert default_resource("!!", "") is None
    assert Options().resource_for("nvidia", "gpu", H100) != "nvidia.com/gpu"


def test_the_first_matching_resource_rule_wins_and_an_empty_one_leaves_a_group_out() -> None:
    options = build(
        resources=[
            f"nvidia/gpu/{H100}=nvidia.com/gpu",
            "nvidia/gpu=example.com/other-nvidia",
            "amd/gpu=",
        ]
    )
    assert options.resource_for("nvidia", "gpu", H100) == "nvidia.com/gpu"
    assert options.resource_for("nvidia", "gpu", "NVIDIA A100") == "example.com/other-nvidia"
    assert options.resource_for("amd", "gpu", "MI300X") is None
    assert options.resource_for("intel", "gpu", "Arc") == "hotplug-monitor.io/intel-gpu"
    only = build(resources=["gpu=example.com/gpu"], only_listed=True)
    assert only.resource_for("intel", "gpu", "Arc") == "example.com/gpu"
    assert only.resource_for("intel", "accelerator", "Gaudi") is None


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        ({"resources": ["nvidia/gpu"]}, "write GROUP=RESOURCE"),
        ({"resources": ["nvidia/gpu=gpu"]}, "is not a resource name DOMAIN/NAME"),
        ({"resources": ["nvidia/gpu=localhost/gpu"]}, "with a domain of your own"),
        ({"resources": ["nvidia/gpu=example.com/-gpu"]}, "beginning and ending"),
        ({"resources": ["nvidia/gpu=kubernetes.io/gpu"]}, "Kubernetes' own"),
        ({"resources": ["nvidia/gpu=x.k8s.io/gpu"]}, "Kubernetes' own"),
        ({"resources": ["a//b=example.com/gpu"]}, "is not TYPE, VENDOR/TYPE"),
        ({"only_listed": True}, "--only-listed needs"),
        ({"ignore_devices": ["GPU 0"]}, "neither a PCI address"),
        ({"socket": Path("relative.sock")}, "--socket must be an absolute path"),
        ({"kubelet_dir": Path("/" + "d" * 120)}, "too long for a socket"),
        ({"reconcile_interval": 0.0}, "--reconcile-interval must be"),
        ({"reconcile_interval": float("nan")}, "--reconcile-interval must be"),
    ],
)
def test_bad_flags_are_refused_saying_which(flags: dict[str, Any], says: str) -> None:
    with pytest.raises(OptionError, match=None) as refused:
        build(**flags)
    assert says in str(refused.value)


def test_socket_names_are_short_and_tell_resources_apart() -> None:
    options = Options()
    assert options.endpoint(NVIDIA) == "hotplug-monitor-nvidia-gpu.sock"
    assert options.endpoint("nvidia.com/gpu") == "hotplug-monitor-nvidia.com_gpu.sock"
    assert options.kubelet_socket == Path("/var/lib/kubelet/device-plugins/kubelet.sock")


# --- inventory ---------------------------------------------------------------------------


def test_inventory_groups_devices_by_resource_with_numa_and_health() -> None:
    snap = snapshot(
        ("nvidia", "gpu", H100, [device(A, 0), device(C, 1)]),
        ("nvidia", "gpu", "NVIDIA A100", [device(B, 0)]),
        ("amd", "gpu", "MI300X", [device(D, None)]),
    )
    got = inventory(snap, Options())
    assert set(got.resources) == {NVIDIA, "hotplug-monitor.io/amd-gpu"}
    assert [d.id for d in got.devices(NVIDIA)] == [A, B, C]  # two groups, one resource
    assert got.find(NVIDIA, C) == KubeDevice(C, True, 1, C, "")
    assert got.find("hotplug-monitor.io/amd-gpu", D) == KubeDevice(D, True, None, D, "")
    response = list_response(got.devices(NVIDIA))
    assert [(d.ID, d.health, [n.ID for n in d.topology.nodes]) for d in response.devices] == [
        (A, "Healthy", [0]),
        (B, "Healthy", [0]),
        (C, "Healthy", [1]),
    ]
    assert (
        not list_response(got.devices("hotplug-monitor.io/amd-gpu")).devices[0].HasField("topology")
    )


def test_unhealthy_and_devices_held_outside_kubernetes_are_unhealthy_the_kubelets_own_not() -> None:
    snap = snapshot(
        (
            "nvidia",
            "gpu",
            H100,
            [
                device(A, healthy=False, health_desc="XID 79: fallen off the bus"),
                device(B, reserved_by="r-1"),
                device(C, reserved_by="r-2", reserved_owner="nomad"),
                device(D, reserved_by="r-3", reserved_owner="kubelet"),
            ],
        )
    )
    got = {d.id: d for d in inventory(snap, Options()).devices(NVIDIA)}
    assert (got[A].healthy, got[A].why) == (False, "XID 79: fallen off the bus")
    assert (got[B].healthy, got[B].why) == (False, "reserved outside Kubernetes (reservation r-1)")
    assert got[C].why == "reserved outside Kubernetes (reservation r-2, owner nomad)"
    assert got[D].healthy
    assert [d.health for d in list_response(tuple(got.values())).devices] == [
        "Unhealthy",
        "Unhealthy",
        "Unhealthy",
        "Healthy",
    ]


def test_ignored_devices_by_address_or_uuid_are_left_out() -> None:
    snap = snapshot(("nvidia", "gpu", H100, [device(A), device(B), device(C)]))
    options = build(ignore_devices=[A.upper(), uuid(B)])
    assert [d.id for d in inventory(snap, options).devices(NVIDIA)] == [C]


def test_a_hostile_snapshot_costs_only_its_bad_entries() -> None:
    good = device(A, 0)
    snap: dict[str, Any] = snapshot(("nvidia", "gpu", H100, [good]))
    snap["groups"]["x"] = "not a group"
    snap["groups"]["y"] = {"vendor": "", "type": "gpu", "name": "n", "devices": {}}
    snap["groups"]["z"] = {"vendor": "amd", "type": "gpu", "name": "n", "devices": []}
    snap["groups"]["nvidia/gpu/" + H100]["devices"]["bad id!"] = device(B)
    snap["groups"]["nvidia/gpu/" + H100]["devices"][C] = "nope"
    bad_numa = device(D)
    bad_numa["attributes"]["numa_node"] = {"value": "zero"}
    bad_numa["hw_locality"] = {"pci_bus_id": "../../etc"}
    snap["groups"]["nvidia/gpu/" + H100]["devices"][D] = bad_numa
    got = inventory(snap, Options())
    assert [d.id for d in got.devices(NVIDIA)] == [A, D]
    assert got.find(NVIDIA, D) == KubeDevice(D, True, None, D, "")
    assert len(got.skipped) == 5
    assert inventory(None, Options()).resources == {}
    assert inventory({"groups": []}, Options()).skipped == ("the snapshot has no groups",)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=30,
)


@given(JSON)
def test_no_snapshot_makes_inventory_raise(garbage: Any) -> None:
    """Whatever arrives, ``inventory`` returns (it never raises) and offers no device made of
    garbage: no key of 8 characters is a PCI address."""
    for shape in (garbage, {"groups": garbage}, {"groups": {"k": garbage}}):
        got = inventory(shape, Options())
        assert isinstance(got, Inventory) and got.resources == {}, got


def test_an_unreachable_daemon_keeps_the_devices_all_unhealthy() -> None:
    last = inventory(snapshot(("nvidia", "gpu", H100, [device(A), device(B)])), Options())
    down = unreachable(last)
    assert [d.id for d in down.devices(NVIDIA)] == [A, B]
    assert {(d.healthy, d.why) for d in down.devices(NVIDIA)} == {(False, UNREACHABLE)}


# --- preferred allocation ----------------------------------------------------------------


def kube(address: str, numa: int | None) -> KubeDevice:
    return KubeDevice(address, True, numa, address)


# Two NUMA nodes; on each, two GPUs behind one switch (consecutive buses) and one far away.
NODE0 = [kube("0000:3b:00.0", 0), kube("0000:3c:00.0", 0), kube("0000:5e:00.0", 0)]
NODE1 = [kube("0000:86:00.0", 1), kube("0000:87:00.0", 1), kube("0000:af:00.0", 1)]
ALL = NODE0 + NODE1
IDS = [d.id for d in ALL]


def test_preferred_takes_one_numa_node_and_the_closest_devices_on_it() -> None:
    assert preferred(IDS, [], 2, ALL) == ["0000:3b:00.0", "0000:3c:00.0"]
    assert preferred(IDS, [], 3, ALL) == ["0000:3b:00.0", "0000:3c:00.0", "0000:5e:00.0"]
    # The tightest fit: with one of node 0 taken, two more fill node 0 and leave node 1 whole
    # for a request of three; three go to node 1.
    rest = [i for i in IDS if i != "0000:3c:00.0"]
    assert preferred(rest, [], 2, ALL) == ["0000:3b:00.0", "0000:5e:00.0"]
    assert preferred(rest, [], 3, ALL) == ["0000:86:00.0", "0000:87:00.0", "0000:af:00.0"]
    assert preferred(rest[1:], [], 2, ALL) == ["0000:86:00.0", "0000:87:00.0"]
    # More than a node has: the fullest node, then the next.
    four = preferred(IDS, [], 4, ALL)
    assert four[:3] == ["0000:3b:00.0", "0000:3c:00.0", "0000:5e:00.0"] and four[3] in IDS[3:]


def test_preferred_honours_must_include_and_stays_near_it() -> None:
    assert preferred(IDS, ["0000:af:00.0"], 2, ALL) == ["0000:af:00.0", "0000:87:00.0"]
    assert preferred(IDS, ["0000:86:00.0"], 2, ALL) == ["0000:86:00.0", "0000:87:00.0"]
    assert preferred(IDS, ["0000:3b:00.0", "0000:af:00.0"], 2, ALL) == [
        "0000:3b:00.0",
        "0000:af:00.0",
    ]
    assert preferred(IDS, ["0000:3b:00.0"], 1, ALL) == ["0000:3b:00.0"]


def test_preferred_without_topology_falls_back_to_pci_closeness() -> None:
    flat = [KubeDevice(d.id, True, None, d.id) for d in ALL]
    assert preferred(IDS, [], 2, flat) == ["0000:3b:00.0", "0000:3c:00.0"]
    unknown = ["a", "b", "c"]
    assert preferred(unknown, [], 2, []) == ["a", "b"]
    assert distance(kube("0000:3b:00.0", 0), kube("0001:3b:00.0", 0)) > distance(
        kube("0000:3b:00.0", 0), kube("0000:af:00.0", 0)
    )


@given(
    st.lists(st.sampled_from([*IDS, "x", "y"]), max_size=10),
    st.lists(st.sampled_from([*IDS, "z"]), max_size=4),
    st.integers(min_value=-1, max_value=10),
)
def test_preferred_is_always_a_valid_answer(
    available: list[str], must: list[str], size: int
) -> None:
    got = preferred(available, must, size, ALL)
    assert len(got) == len(set(got)) <= max(size, 0)
    assert set(got) <= set(available)
    must_offered = [m for m in dict.fromkeys(must) if m in available][: max(size, 0)]
    assert got[: len(must_offered)] == must_offered
    assert len(got) == min(max(size, 0), len(set(available)))


# --- reconcile ---------------------------------------------------------------------------


def test_in_use_counts_our_resources_only_and_recent_allocations_are_kept() -> None:
    answer = pr.ListPodResourcesResponse(
        pod_resources=[
            pr.PodResources(
                name="p",
                namespace="default",
                containers=[
                    pr.ContainerResources(
                        name="c",
                        devices=[
                            pr.ContainerDevices(resource_name=NVIDIA, device_ids=[A]),
                            pr.ContainerDevices(resource_name="nvidia.com/gpu", device_ids=[B]),
                            pr.ContainerDevices(resource_name=NVIDIA, device_ids=["../bad id"]),
                        ],
                    )
                ],
            )
        ]
    )
    assert in_use(answer, [NVIDIA]) == {A}
    assert still_used({A}, {C: 100.0, D: 90.0}, now=101.0, grace=5.0) == [A, C]


# --- Allocate's answer -------------------------------------------------------------------


CARD = f"/dev/dri/by-path/pci-{A}-card"
RESERVATION = {
    "reservation_id": "r-1",
    "device_ids": [A],
    "envs": {"NVIDIA_VISIBLE_DEVICES": UUID_A},
    "mounts": [{"task_path": CARD, "host_path": CARD, "read_only": True}],
    "devices": [
        {"task_path": "/dev/nvidia0", "host_path": "/dev/nvidia0", "cgroup_perms": "rwm"},
        {"task_path": "/dev/nvidiactl", "host_path": "/dev/nvidiactl", "cgroup_perms": "rwm"},
    ],
    "cdi_devices": [f"hotplug-monitor.io/gpu={A}"],
}  # fmt: skip


def test_the_container_response_carries_envs_devices_mounts_and_cdi_names() -> None:
    got = container_response(copy.deepcopy(RESERVATION), cdi=True)
    assert dict(got.envs) == {"NVIDIA_VISIBLE_DEVICES": UUID_A}
    assert [(d.container_path, d.host_path, d.permissions) for d in got.devices] == [
        ("/dev/nvidia0", "/dev/nvidia0", "rwm"),
        ("/dev/nvidiactl", "/dev/nvidiactl", "rwm"),
    ]
    assert [(m.container_path, m.read_only) for m in got.mounts] == [(CARD, True)]
    assert [c.name for c in got.cdi_devices] == [f"hotplug-monitor.io/gpu={A}"]
    # At field 5, as upstream's: a 1.20 kubelet skips it as an unknown field.
    assert got.DESCRIPTOR.fields_by_name["cdi_devices"].number == 5
    assert not container_response(copy.deepcopy(RESERVATION), cdi=False).cdi_devices


def test_registration_speaks_v1beta1() -> None:
    assert opts.API_VERSION == "v1beta1" and opts.OWNER == "kubelet"

"""The kubelet plugin and MIG instances, by plain calls on a hand-written snapshot
(``tests/mig_snapshot.py``): each --mig-strategy's resources, what it leaves out and says so,
--resource rules over the strategy, ignoring a GPU's instances, and GetPreferredAllocation
among instances that share their GPU's PCI address."""

from __future__ import annotations

import pytest

from monitor.adapters.kubelet.inventory import inventory
from monitor.adapters.kubelet.options import (
    OptionError,
    Options,
    build,
    check_resource_name,
    mig_resource,
)
from monitor.adapters.kubelet.preferred import preferred
from monitor.adapters.kubelet.rpc import list_response
from tests.mig_snapshot import (
    A1,
    A2,
    A3,
    B1,
    B2,
    GPU_A,
    H100,
    PARENT,
    WHOLE,
    group,
    group_name,
    instance,
    one_profile_node,
    snapshot,
    split_node,
    whole_gpu,
)

GPU = "hotplug-monitor.io/nvidia-gpu"
SMALL, LARGE = "hotplug-monitor.io/mig-1g.10gb", "hotplug-monitor.io/mig-3g.40gb"


def offer(snap: object, *flags: str, strategy: str = "mixed") -> dict[str, list[str]]:
    options = build(resources=flags, mig_strategy=strategy)
    found = inventory(snap, options)
    return {r: [d.id for d in devices] for r, devices in found.resources.items()}


def test_mixed_is_the_default_and_offers_one_resource_a_profile() -> None:
    assert Options().mig_strategy == "mixed"
    assert offer(split_node()) == {GPU: [WHOLE], SMALL: [A1, A2, B1, B2], LARGE: [A3]}


def test_mixed_names_are_valid_extended_resource_names_and_keep_media_profiles_apart() -> None:
    for name in (SMALL, LARGE):
        assert check_resource_name(name) == name
    assert mig_resource("1g.10gb+me") == "hotplug-monitor.io/mig-1g.10gb.me"
    assert mig_resource("1g.10gb", shared=True) == "hotplug-monitor.io/mig-1g.10gb.shared"
    assert mig_resource("1c.3g.40gb") == "hotplug-monitor.io/mig-1c.3g.40gb"
    media = snapshot(
        group("nvidia", "mig", group_name("1g.10gb"), [instance(A1, GPU_A, "1g.10gb", 9)]),
        group("nvidia", "mig", group_name("1g.10gb+me"), [instance(A2, GPU_A, "1g.10gb+me", 7)]),
    )
    assert offer(media) == {SMALL: [A1], "hotplug-monitor.io/mig-1g.10gb.me": [A2]}


def test_none_offers_no_instance_and_says_so_in_one_line() -> None:
    found = inventory(split_node(), build(mig_strategy="none"))
    assert {r: [d.id for d in ds] for r, ds in found.resources.items()} == {GPU: [WHOLE]}
    [said] = [s for s in found.skipped if "MIG" in s]
    assert "5 MIG instances" in said and "--mig-strategy none" in said
    assert "not leased whole" in said and "--mig-strategy mixed or single" in said


def test_single_offers_every_instance_as_the_gpus_resource_when_one_profile() -> None:
    found = inventory(one_profile_node(), build(mig_strategy="single"))
    assert {r: [d.id for d in ds] for r, ds in found.resources.items()} == {GPU: [A1, A2, B1]}
    assert found.skipped == ()
    # ... and as whatever --resource the GPU's group has
    assert offer(one_profile_node(), "nvidia/gpu=nvidia.com/gpu", strategy="single") == {
        "nvidia.com/gpu": [A1, A2, B1]
    }
    named = f"nvidia/gpu/{H100}=example.com/h100"
    assert offer(one_profile_node(), named, strategy="single") == {"example.com/h100": [A1, A2, B1]}


def test_single_refuses_a_node_with_two_profiles_and_offers_none_of_its_instances() -> None:
    only_migs = {k: v for k, v in split_node()["groups"].items() if "/mig/" in k}
    found = inventory({"groups": only_migs}, build(mig_strategy="single"))
    assert found.resources == {}
    [said] = found.skipped
    assert said.startswith(f"5 MIG instances not offered as {GPU}")
    assert "one profile for all, not 1g.10gb, 3g.40gb" in said and "mixed" in said


def test_single_refuses_instances_beside_a_whole_gpu_which_stays_offered() -> None:
    node = snapshot(
        *one_profile_node()["groups"].items(), group("nvidia", "gpu", H100, [whole_gpu()])
    )
    found = inventory(node, build(mig_strategy="single"))
    assert {r: [d.id for d in ds] for r, ds in found.resources.items()} == {GPU: [WHOLE]}
    [said] = found.skipped
    assert "not whole GPUs beside" in said and WHOLE in said


def test_a_resource_rule_for_the_mig_group_wins_over_the_strategy() -> None:
    assert offer(split_node(), "mig=example.com/mig") == {
        GPU: [WHOLE],
        "example.com/mig": [A1, A2, A3, B1, B2],
    }
    assert offer(split_node(), f"nvidia/mig/{group_name('3g.40gb')}=") == {
        GPU: [WHOLE],
        SMALL: [A1, A2, B1, B2],
    }


def test_only_listed_leaves_unlisted_profiles_out() -> None:
    options = build(resources=["mig=example.com/mig-all"], only_listed=True)
    found = inventory(split_node(), options)
    assert {r: [d.id for d in ds] for r, ds in found.resources.items()} == {
        "example.com/mig-all": [A1, A2, A3, B1, B2]
    }
    options = build(resources=["gpu=example.com/gpu"], only_listed=True)
    assert set(inventory(split_node(), options).resources) == {"example.com/gpu"}


def test_ignoring_a_gpu_by_uuid_or_address_ignores_its_instances() -> None:
    for ignored in (PARENT[GPU_A], GPU_A):
        found = inventory(split_node(), build(ignore_devices=[ignored]))
        assert {r: [d.id for d in ds] for r, ds in found.resources.items()} == {
            GPU: [WHOLE],
            SMALL: [B1, B2],
        }
    found = inventory(split_node(), build(ignore_devices=[A3]))
    assert LARGE not in found.resources


def test_an_instance_is_listed_with_its_gpus_numa_node_and_health() -> None:
    sick = instance(A1, GPU_A, "1g.10gb", 9, healthy=False)
    held = instance(A2, GPU_A, "1g.10gb", 10, reserved_by="r-1", reserved_owner="nomad")
    found = inventory(split_node({A1: sick, A2: held}), Options())
    devices = {d.id: d for d in found.devices(SMALL)}
    assert devices[A1].healthy is False and "XID 79" in devices[A1].why
    assert devices[A2].healthy is False and "reserved outside Kubernetes" in devices[A2].why
    assert devices[B1].healthy and devices[B1].numa_node == 1
    assert devices[A1].pci_address == GPU_A  # its GPU's, shared with A2 and A3
    listed = list_response(found.devices(SMALL))
    assert [(d.ID, d.health, [n.ID for n in d.topology.nodes]) for d in listed.devices] == [
        (A1, "Unhealthy", [0]),
        (A2, "Unhealthy", [0]),
        (B1, "Healthy", [1]),
        (B2, "Healthy", [1]),
    ]


def test_an_instance_without_a_usable_profile_is_left_out_and_named() -> None:
    odd = instance(A1, GPU_A, "1g.10gb", 9)
    odd["attributes"]["mig_profile"] = {"value": "1g.10gb; rm -rf"}
    found = inventory(split_node({A1: odd}), Options())
    assert A1 not in {d.id for d in found.devices(SMALL)}
    assert any(A1 in s and "no usable profile" in s for s in found.skipped)


def test_preferred_allocation_packs_instances_of_one_gpu_and_keeps_to_a_numa_node() -> None:
    devices = inventory(split_node(), Options()).devices(SMALL)
    # Two instances: both of one GPU (one PCI address, one NUMA node), never one of each.
    two = preferred([A1, A2, B1, B2], [], 2, devices)
    assert sorted(two) in ([A1, A2], [B1, B2])
    # One already taken on B: the other of B comes next.
    assert preferred([A1, A2, B1, B2], [B1], 2, devices) == [B1, B2]
    # Many instances at one address are answered in full, each once.
    assert sorted(preferred([A1, A2, B1, B2], [], 4, devices)) == [A1, A2, B1, B2]


def test_the_strategy_flag_is_checked() -> None:
    with pytest.raises(OptionError, match="--mig-strategy 'some'"):
        build(mig_strategy="some")
    assert build(ignore_devices=[A1]).ignored == {A1}

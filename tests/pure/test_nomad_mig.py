"""The Nomad plugin and MIG instances, by plain calls on a hand-written snapshot
(``tests/mig_snapshot.py``): one device group a profile with the instances' common attributes in
Nomad's units, each instance at its GPU's PCI address, ignoring a GPU ignores its instances,
and an instance's statistics only as the daemon gives them."""

from __future__ import annotations

from typing import Any

from monitor.adapters.nomad import config, translate
from monitor.adapters.nomad.config import Overrides
from monitor.adapters.nomad.protos import structs_pb2
from monitor.wire import stats
from tests.mig_snapshot import (
    A1,
    A2,
    A3,
    B1,
    B2,
    GPU_A,
    GPU_B,
    H100,
    PARENT,
    WHOLE,
    group,
    group_name,
    instance,
    snapshot,
    split_node,
)

SMALL, LARGE = ("nvidia", "mig", group_name("1g.10gb")), ("nvidia", "mig", group_name("3g.40gb"))


def offer(snap: object, **settings: Any) -> translate.Offered:
    return translate.offered(snap, config.settle(settings))


def groups(found: translate.Offered) -> dict[tuple[str, str, str], Any]:
    return {(g.vendor, g.device_type, g.device_name): g for g in found.groups}


def test_each_profile_is_a_device_group_of_its_instances() -> None:
    found = groups(offer(split_node()))
    assert set(found) == {SMALL, LARGE, ("nvidia", "gpu", H100)}
    small = found[SMALL]
    assert [d.ID for d in small.devices] == [A1, A2, B1, B2]
    assert [d.hw_locality.pci_bus_id for d in small.devices] == [GPU_A, GPU_A, GPU_B, GPU_B]
    assert all(d.healthy for d in small.devices)
    assert [d.ID for d in found[LARGE].devices] == [A3]


def test_the_groups_attributes_are_what_its_instances_share_in_nomads_units() -> None:
    small = groups(offer(split_node()))[SMALL]
    attributes = dict(small.attributes)
    assert attributes["mig_profile"] == structs_pb2.Attribute(string_val="1g.10gb")
    assert attributes["memory"] == structs_pb2.Attribute(int_val=9856, unit="MiB")
    assert attributes["gpu_slices"] == structs_pb2.Attribute(int_val=1)
    assert attributes["compute_slices"] == structs_pb2.Attribute(int_val=1)
    # What differs from one instance to the next (its GPU, its IDs) is no group attribute.
    assert not {"gpu_instance_id", "parent_uuid", "parent_pci_bus_id", "numa_node"} & set(
        attributes
    )
    large = dict(groups(offer(split_node()))[LARGE].attributes)
    assert large["parent_uuid"].string_val == PARENT[GPU_A]  # one instance: all its own
    assert large["memory"] == structs_pb2.Attribute(int_val=40192, unit="MiB")


def test_an_instance_held_outside_nomad_or_unhealthy_says_why() -> None:
    sick = instance(A1, GPU_A, "1g.10gb", 9, healthy=False)
    held = instance(A2, GPU_A, "1g.10gb", 10, reserved_by="r-9", reserved_owner="kubelet")
    devices = {d.ID: d for d in groups(offer(split_node({A1: sick, A2: held})))[SMALL].devices}
    assert not devices[A1].healthy and "XID 79" in devices[A1].health_description
    assert not devices[A2].healthy and "owner kubelet" in devices[A2].health_description
    assert devices[B1].healthy


def test_ignoring_a_gpu_ignores_its_instances_and_groups_pick_profiles() -> None:
    for ignored in (PARENT[GPU_A], GPU_A):
        found = offer(split_node(), ignored_device_ids=[ignored])
        assert set(found.by_device) == {B1, B2, WHOLE}
        assert translate.not_offered(A1, split_node(), found_config(ignored)) is not None
    only = offer(split_node(), groups=[f"nvidia/mig/{group_name('3g.40gb')}"])
    assert set(only.by_device) == {A3}
    mig_only = offer(split_node(), groups=["nvidia/mig"])
    assert set(mig_only.by_device) == {A1, A2, A3, B1, B2}
    assert translate.not_offered(WHOLE, split_node(), config.settle({"groups": ["mig"]}))
    assert translate.not_offered(A1, split_node(), config.settle({"groups": ["mig"]})) is None


def found_config(ignored: str) -> config.PluginConfig:
    return config.settle({}, Overrides(ignored_device_ids=(ignored,)))


def test_an_instances_stats_are_what_the_daemon_gives_for_it_and_nothing_else() -> None:
    found = offer(split_node())
    used = {"value": 1024, "unit": stats.MEMORY_USED.unit}
    total = {"value": 9856, "unit": stats.MEMORY_TOTAL.unit}
    sample = {
        "time": 1_800_000_000,
        "devices": {
            A1: {stats.MEMORY_USED.name: used, stats.MEMORY_TOTAL.name: total},
            GPU_A: {stats.POWER_USAGE.name: {"value": 300, "unit": "W"}},  # the GPU's own
        },
    }
    response = translate.stats_response(sample, found)
    by_group = {(g.vendor, g.type, g.name): dict(g.instance_stats) for g in response.groups}
    assert set(by_group) == {SMALL}  # the GPU's figures are not an instance's
    assert set(by_group[SMALL]) == {A1}
    memory = by_group[SMALL][A1].stats.attributes[stats.MEMORY_USED.name]
    assert (memory.int_numerator_val.value, memory.int_denominator_val.value) == (1024, 9856)


def test_replicas_of_an_instance_each_get_its_stats() -> None:
    replicas = [{**instance(A1, GPU_A, "1g.10gb", 9), "id": f"{A1}::{k}"} for k in (0, 1)]
    shared = snapshot(group("nvidia", "mig.shared", group_name("1g.10gb"), replicas))
    found = offer(shared)
    sample = {"time": 1, "devices": {A1: {stats.GPU_UTILIZATION.name: {"value": 50, "unit": "%"}}}}
    [stat_group] = translate.stats_response(sample, found).groups
    assert set(stat_group.instance_stats) == {f"{A1}::0", f"{A1}::1"}


def test_mig_uuids_are_ignorable_ids() -> None:
    assert config.settle({"ignored_device_ids": [A1]}).ignored == {A1}
    assert set(offer(split_node(), ignored_device_ids=[A1]).by_device) == {A2, A3, B1, B2, WHOLE}

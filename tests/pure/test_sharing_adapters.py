"""A shared GPU as each consumer sees it: the kubelet's resources and Nomad's device groups,
from the snapshot the core builds (not a hand-written one), so that the two sides agree."""

from __future__ import annotations

from typing import Any

import attrs

from monitor.adapters.kubelet.inventory import inventory
from monitor.adapters.kubelet.options import build
from monitor.adapters.kubelet.rpc import list_response
from monitor.adapters.nomad import translate
from monitor.adapters.nomad.config import PluginConfig
from monitor.core.events import DeviceSeen, NvmlGpuSeen, SharePolicyChanged
from monitor.core.replicas import SharePolicy, ShareRule
from monitor.wire import stats
from monitor.wire.snapshot import GroupPattern
from tests.pure.examples import GPU, GPU_UUID, H100, H100_B, OTHER_MEMBER, reserve, run

A, B = H100.address, H100_B.address
SHARED_RESOURCE = "hotplug-monitor.io/nvidia-gpu.shared"


def host() -> dict[str, Any]:
    """A shared as 3 replicas (one held by the kubelet, one by a person); B, another model,
    whole."""
    policy = SharePolicy(rules=(ShareRule("10de:2330", 3),))
    other = attrs.evolve(H100_B, device_id=0x2331, model="H200")
    state, _ = run(
        SharePolicyChanged(policy),
        DeviceSeen(H100),
        DeviceSeen(other),
        NvmlGpuSeen(GPU),
        reserve(f"{A}::0", owner="kubelet", peer=OTHER_MEMBER, lease_id="k-1"),
        reserve(f"{A}::1", lease_id="person-1"),
    )
    found: dict[str, Any] = state.fingerprint.to_json()
    return found


def test_the_kubelet_offers_replicas_as_their_own_resource_with_the_gpus_numa_node() -> None:
    found = inventory(host(), build())
    assert set(found.resources) == {SHARED_RESOURCE, "hotplug-monitor.io/nvidia-gpu"}
    replicas = found.devices(SHARED_RESOURCE)
    assert [d.id for d in replicas] == [f"{A}::0", f"{A}::1", f"{A}::2"]
    assert [d.healthy for d in replicas] == [True, False, True]  # held outside Kubernetes
    assert "reserved outside Kubernetes (reservation person-1)" in replicas[1].why
    assert {(d.numa_node, d.pci_address) for d in replicas} == {(1, A)}
    assert [d.id for d in found.devices("hotplug-monitor.io/nvidia-gpu")] == [B]
    listed = list_response(replicas)
    assert [d.ID for d in listed.devices] == [f"{A}::0", f"{A}::1", f"{A}::2"]


def test_the_kubelets_resource_rules_rename_or_leave_out_the_shared_group() -> None:
    renamed = inventory(host(), build(resources=["nvidia/gpu.shared=nvidia.com/gpu.shared"]))
    assert [d.id for d in renamed.devices("nvidia.com/gpu.shared")] == [
        f"{A}::0", f"{A}::1", f"{A}::2",
    ]  # fmt: skip
    left_out = inventory(host(), build(resources=["gpu.shared="]))
    assert SHARED_RESOURCE not in left_out.resources
    by_gpu = inventory(host(), build(ignore_devices=[A]))  # ignoring a GPU ignores its replicas
    assert SHARED_RESOURCE not in by_gpu.resources
    by_uuid = inventory(host(), build(ignore_devices=[GPU_UUID]))
    assert SHARED_RESOURCE not in by_uuid.resources


def test_nomad_gets_the_replicas_in_a_group_of_their_own() -> None:
    offer = translate.offered(host(), PluginConfig())
    groups = {(g.vendor, g.device_type, g.device_name): g for g in offer.groups}
    shared = groups[("nvidia", "gpu.shared", "H100 SXM5 80GB")]
    assert [d.ID for d in shared.devices] == [f"{A}::0", f"{A}::1", f"{A}::2"]
    assert [d.healthy for d in shared.devices] == [True, False, True]
    assert {d.hw_locality.pci_bus_id for d in shared.devices} == {A}
    assert shared.attributes["replicas"].int_val == 3
    assert shared.attributes["uuid"].string_val == GPU_UUID
    assert [d.ID for d in groups[("nvidia", "gpu", "H200")].devices] == [B]
    only_whole = translate.offered(host(), PluginConfig(groups=(GroupPattern.parse("nvidia/gpu"),)))
    assert {g.device_type for g in only_whole.groups} == {"gpu"}  # a job asking for a GPU gets one
    ignored = translate.offered(host(), PluginConfig(ignored=frozenset({A})))
    assert {g.device_type for g in ignored.groups} == {"gpu"}
    assert translate.not_offered(f"{A}::2", host(), PluginConfig(ignored=frozenset({A}))) == (
        f"{A}::2 is not offered to Nomad: its GPU is in ignored_device_ids"
    )


def test_nomad_gives_each_replica_its_gpus_stats() -> None:
    offer = translate.offered(host(), PluginConfig())
    sample = {"time": 1.0, "devices": {A: {stats.POWER_USAGE.name: {"value": 300, "unit": "W"}}}}
    response = translate.stats_response(sample, offer)
    [group] = response.groups
    assert group.type == "gpu.shared"
    assert set(group.instance_stats) == {f"{A}::0", f"{A}::1", f"{A}::2"}
    power = group.instance_stats[f"{A}::2"].stats.attributes[stats.POWER_USAGE.name]
    assert power.int_numerator_val.value == 300

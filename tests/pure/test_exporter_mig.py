"""The exporter and MIG instances, by plain calls on a hand-written snapshot
(``tests/mig_snapshot.py``): each instance is a device of its own (``device`` = its MIG UUID)
whose ``hotplug_monitor_device_info`` names its profile and GPU (empty for other devices), its
telemetry only what the daemon gives under its MIG UUID, a replica of an instance shown as a
shared GPU's replica is."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from monitor.adapters.exporter import metrics
from monitor.adapters.exporter.known import Known
from monitor.wire import stats
from monitor.wire.mirror import Mirror
from tests.mig_snapshot import (
    A1,
    A2,
    A3,
    B1,
    B2,
    GPU_A,
    PARENT,
    WHOLE,
    group,
    group_name,
    instance,
    snapshot,
    split_node,
)

Scrape = dict[str, dict[tuple[tuple[str, str], ...], float]]


def scrape(known: Known) -> Scrape:
    found: Scrape = {}
    for family in text_string_to_metric_families(metrics.render(known).decode()):
        for s in family.samples:
            assert isinstance(s, Sample)
            found.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return found


def labels(found: Scrape, metric: str, device: str) -> dict[str, str]:
    [key] = [k for k in found[metric] if dict(k)["device"] == device]
    return dict(key)


def known_of(snap: dict[str, Any]) -> Known:
    known = Known()
    known.snapshot(Mirror({"generation": 1, "snapshot": snap}))
    return known


def test_every_instance_is_a_device_with_its_profile_and_gpu_on_device_info() -> None:
    found = scrape(known_of(split_node()))
    info = "hotplug_monitor_device_info"
    assert {dict(k)["device"] for k in found[info]} == {A1, A2, A3, B1, B2, WHOLE}
    small = labels(found, info, A1)
    assert small["mig_profile"] == "1g.10gb" and small["parent_uuid"] == PARENT[GPU_A]
    assert small["type"] == "mig" and small["name"] == group_name("1g.10gb")
    assert small["numa_node"] == "0"
    assert labels(found, info, A3)["mig_profile"] == "3g.40gb"
    whole = labels(found, info, WHOLE)
    assert whole["mig_profile"] == "" and whole["parent_uuid"] == ""
    # The per-device series carry the device alone: the profile is joined from device_info.
    assert labels(found, "hotplug_monitor_device_healthy", A1) == {"device": A1}


def test_an_instances_health_and_lease_are_its_own() -> None:
    sick = instance(A1, GPU_A, "1g.10gb", 9, healthy=False)
    held = instance(A2, GPU_A, "1g.10gb", 10, reserved_by="r-1", reserved_owner="kubelet")
    found = scrape(known_of(split_node({A1: sick, A2: held})))
    healthy = found["hotplug_monitor_device_healthy"]
    assert healthy[(("device", A1),)] == 0 and healthy[(("device", B1),)] == 1
    reserved = found["hotplug_monitor_device_reserved"]
    assert reserved[(("device", A2), ("owner", "kubelet"))] == 1


def test_an_instances_telemetry_is_what_the_daemon_gives_under_its_mig_uuid() -> None:
    known = known_of(split_node())
    used = {"value": 1024.0, "unit": stats.MEMORY_USED.unit}
    known.stats(
        {
            "time": 1_800_000_000.0,
            "devices": {
                A1: {stats.MEMORY_USED.name: used},
                GPU_A: {stats.POWER_USAGE.name: {"value": 300.0, "unit": "W"}},  # no device
            },
        }
    )
    found = scrape(known)
    assert found["hotplug_monitor_device_memory_used_bytes"] == {
        (("device", A1),): 1024.0 * (1 << 20)
    }
    assert "hotplug_monitor_device_power_watts" not in found  # its GPU's is not invented


def test_replicas_of_an_instance_show_its_telemetry_once_on_replica_zero() -> None:
    replicas = [{**instance(A1, GPU_A, "1g.10gb", 9), "id": f"{A1}::{k}"} for k in (0, 1)]
    known = known_of(snapshot(group("nvidia", "mig.shared", group_name("1g.10gb"), replicas)))
    known.stats({"time": 1.0, "devices": {A1: {stats.GPU_UTILIZATION.name: {"value": 50.0}}}})
    found = scrape(known)
    assert found["hotplug_monitor_device_gpu_utilization_ratio"] == {(("device", f"{A1}::0"),): 0.5}
    assert labels(found, "hotplug_monitor_device_info", f"{A1}::1")["mig_profile"] == "1g.10gb"


def test_a_bad_profile_or_id_is_not_shown() -> None:
    odd = instance(A1, GPU_A, "1g.10gb", 9)
    odd["attributes"]["mig_profile"] = {"value": 'x"} 1\n'}
    bad_id = {**instance(A2, GPU_A, "1g.10gb", 10), "id": "MIG-not-a-uuid"}
    snap = snapshot(group("nvidia", "mig", group_name("1g.10gb"), [odd, bad_id]))
    found = scrape(known_of(snap))
    assert {dict(k)["device"] for k in found["hotplug_monitor_device_info"]} == {A1}
    assert labels(found, "hotplug_monitor_device_info", A1)["mig_profile"] == ""

"""The exporter's decisions by plain calls: what a scrape shows of what it knows, in Prometheus's
base units and names, and what it does with a daemon that sends nonsense."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from monitor.adapters.exporter import metrics
from monitor.adapters.exporter.known import MAX_DEVICES, MAX_TEXT, MAX_XIDS, Known
from monitor.adapters.exporter.run import parse_listen
from monitor.core.xid_catalog import ACTIONS
from monitor.wire import stats
from monitor.wire.mirror import Mirror

ROOT = Path(__file__).resolve().parents[2]
A, B, GONE = "0000:3b:00.0", "0000:86:00.0", "0000:af:00.0"
H100 = "nvidia/gpu/NVIDIA H100 80GB HBM3"
UUID = "GPU-0a0a0a0a-1111-2222-3333-444444444444"


def attribute(value: Any, unit: str | None = None) -> dict[str, Any]:
    return {"value": value} if unit is None else {"value": value, "unit": unit}


def gpu(address: str, **extra: Any) -> dict[str, Any]:
    device: dict[str, Any] = {
        "id": address,
        "healthy": True,
        "health_desc": "",
        "hw_locality": {"pci_bus_id": address},
        "attributes": {
            "driver": attribute("nvidia"),
            "numa_node": attribute(1),
            "uuid": attribute(UUID if address == A else "GPU-b"),
        },
        "reserved_by": None,
        "reserved_owner": None,
    }
    device.update(extra)
    return device


def mirror(*devices: dict[str, Any], generation: int = 1) -> Mirror:
    group = {
        "vendor": "nvidia",
        "type": "gpu",
        "name": "NVIDIA H100 80GB HBM3",
        "attributes": {},
        "devices": {d["id"]: d for d in devices},
    }
    return Mirror({"generation": generation, "snapshot": {"groups": {H100: group}}})


def sample(**by_device: dict[str, Any]) -> dict[str, Any]:
    return {
        "time": 1_800_000_000.5,
        "devices": {
            address.replace("_", ":"): {
                name: {"value": value, "unit": stats.BY_NAME[name].unit}
                for name, value in found.items()
            }
            for address, found in by_device.items()
        },
    }


STATUS = {
    "started": 1_799_999_000.25,
    "generation": 7,
    "devices": 2,
    "uevents": 120,
    "resyncs": {"start": 1, "overflow": 2},
    "subscribers": 3,
    "stats_subscribers": 1,
    "leases": 1,
    "nvml_worker_restarts": 0,
    "publish_latency_seconds": {
        "buckets": [[0.0005, 3], [0.001, 9], [0.0025, 10]],
        "sum": 0.0071,
        "count": 11,
    },
}


def scrape(known: Known) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every sample of a scrape by name, keyed by its labels (sorted), as Prometheus reads it."""
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(metrics.render(known).decode()):
        for s in family.samples:
            assert isinstance(s, Sample)
            found.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return found


def one(found: dict[str, dict[Any, float]], metric: str, /, **labels: str) -> float:
    return found[metric][tuple(sorted(labels.items()))]


def test_a_device_its_health_reservation_and_daemon_counters() -> None:
    known = Known()
    reserved = gpu(B, healthy=False, health_desc="PCI error", reserved_by="r-1")
    reserved["reserved_owner"] = "nomad"
    known.snapshot(mirror(gpu(A), reserved))
    known.counters(STATUS)
    found = scrape(known)
    assert one(found, "hotplug_monitor_up") == 1
    info = {
        "device": A,
        "group": H100,
        "vendor": "nvidia",
        "type": "gpu",
        "name": "NVIDIA H100 80GB HBM3",
        "driver": "nvidia",
        "numa_node": "1",
        "uuid": UUID,
        "mig_profile": "",  # a GPU, not a MIG instance
        "parent_uuid": "",
    }
    assert one(found, "hotplug_monitor_device_info", **info) == 1
    assert one(found, "hotplug_monitor_device_healthy", device=A) == 1
    assert one(found, "hotplug_monitor_device_healthy", device=B) == 0
    assert one(found, "hotplug_monitor_device_reserved", device=A, owner="") == 0
    assert one(found, "hotplug_monitor_device_reserved", device=B, owner="nomad") == 1
    assert one(found, "hotplug_monitor_device_stale", device=A) == 0
    assert one(found, "hotplug_monitor_uevents_total") == 120
    assert one(found, "hotplug_monitor_resyncs_total", cause="overflow") == 2
    assert one(found, "hotplug_monitor_subscribers") == 3
    assert one(found, "hotplug_monitor_leases") == 1
    assert one(found, "hotplug_monitor_nvml_worker_restarts_total") == 0
    assert one(found, "hotplug_monitor_daemon_start_time_seconds") == 1_799_999_000.25
    latency = "hotplug_monitor_publish_latency_seconds"
    assert one(found, f"{latency}_bucket", le="0.001") == 9
    assert one(found, f"{latency}_bucket", le="+Inf") == 11
    assert one(found, f"{latency}_count") == 11
    assert one(found, f"{latency}_sum") == pytest.approx(0.0071)


def test_telemetry_in_base_units() -> None:
    known = Known()
    known.snapshot(mirror(gpu(A)))
    known.stats(
        sample(
            **{
                A.replace(":", "_"): {
                    "GPU utilization": 71,
                    "Memory state": 40960,
                    "Temperature": 64,
                    "Temperature limit": 87,
                    "Power usage": 412.345,
                    "Energy": 123456.5,
                    "SM clock": 1980,
                    "PCIe TX throughput": 2000,
                    "ECC L2 errors": 4,
                    "ECC volatile corrected": 5,
                    "Throttle reasons": "gpu_idle,sw_power_cap",
                }
            }
        )
    )
    found = scrape(known)
    d = {"device": A}
    assert one(found, "hotplug_monitor_device_gpu_utilization_ratio", **d) == pytest.approx(0.71)
    assert one(found, "hotplug_monitor_device_memory_used_bytes", **d) == 40960 * 2**20
    assert one(found, "hotplug_monitor_device_temperature_celsius", **d) == 64
    assert one(found, "hotplug_monitor_device_temperature_limit_celsius", **d) == 87
    assert one(found, "hotplug_monitor_device_power_watts", **d) == pytest.approx(412.345)
    assert one(found, "hotplug_monitor_device_energy_joules_total", **d) == 123456.5
    assert one(found, "hotplug_monitor_device_sm_clock_hertz", **d) == 1980e6
    assert one(found, "hotplug_monitor_device_pcie_transmit_bytes_per_second", **d) == 2e6
    ecc = "hotplug_monitor_device_ecc_uncorrected_errors_by_location_total"
    assert one(found, ecc, location="l2", **d) == 4
    volatile = "hotplug_monitor_device_ecc_volatile_errors_total"
    assert one(found, volatile, severity="corrected", **d) == 5
    throttle = "hotplug_monitor_device_clock_throttle_reason"
    assert one(found, throttle, reason="sw_power_cap", **d) == 1
    assert one(found, throttle, reason="hw_slowdown", **d) == 0
    assert len(found[throttle]) == len(stats.THROTTLE_REASON_BITS)
    assert one(found, "hotplug_monitor_stats_timestamp_seconds") == 1_800_000_000.5
    # A statistic the device does not give is absent, never 0.
    assert "hotplug_monitor_device_fan_speed_ratio" not in found
    assert "hotplug_monitor_device_memory_free_bytes" not in found


def test_every_statistic_of_the_daemon_has_its_metric() -> None:
    mapped = set(metrics.TELEMETRY) | {stats.THROTTLE_REASONS.name}
    assert mapped == set(stats.BY_NAME)
    for name, telemetry in metrics.TELEMETRY.items():
        counter = telemetry.spec.kind == metrics.COUNTER
        assert counter == stats.BY_NAME[name].counter, name
        assert telemetry.spec.name.endswith("_total") == counter, name


def test_names_follow_prometheus_conventions() -> None:
    names = [spec.name for spec in metrics.METRICS]
    assert len(names) == len(set(names))
    for spec in metrics.METRICS:
        assert re.fullmatch(r"hotplug_monitor_[a-z0-9_]+", spec.name), spec.name
        assert spec.name.endswith("_total") == (spec.kind == metrics.COUNTER), spec.name
        assert not re.search(r"_(percent|mib|mhz|milliseconds|kilobytes)(_|$)", spec.name)
        assert all(re.fullmatch(r"[a-z][a-z0-9_]*", label) for label in spec.labels)
        # per-device series carry the device's address, and nothing unbounded
        if spec.name.startswith("hotplug_monitor_device_"):
            assert spec.labels[0] == metrics.DEVICE, spec.name
        assert spec.help and not spec.help.endswith("."), spec.name


def test_a_scrape_shows_only_the_names_the_list_defines() -> None:
    known = Known()
    known.snapshot(mirror(gpu(A), gpu(B, attributes={"xid_count": attribute(1)})))
    known.counters(STATUS)
    known.stats(
        sample(**{A.replace(":", "_"): {s.name: 1 for s in stats.ALL if s.kind != stats.TEXT}})
    )
    families = {f.name for f in text_string_to_metric_families(metrics.render(known).decode())}
    defined = {spec.name.removesuffix("_total") for spec in metrics.METRICS}
    assert families <= defined
    assert len(families) > 30


def test_while_the_daemon_is_away_the_last_devices_are_shown_stale() -> None:
    known = Known()
    assert one(scrape(known), "hotplug_monitor_up") == 0  # never reached yet: nothing else
    assert "hotplug_monitor_device_info" not in scrape(known)
    known.snapshot(mirror(gpu(A)))
    known.counters(STATUS)
    known.stats(sample(**{A.replace(":", "_"): {"Temperature": 50}}))
    known.snapshot(None)
    found = scrape(known)
    assert one(found, "hotplug_monitor_up") == 0
    assert one(found, "hotplug_monitor_device_stale", device=A) == 1
    assert one(found, "hotplug_monitor_device_healthy", device=A) == 1
    # what the daemon would have to vouch for now is not shown
    assert "hotplug_monitor_device_temperature_celsius" not in found
    assert "hotplug_monitor_uevents_total" not in found
    known.snapshot(mirror(gpu(A), generation=1))
    assert one(scrape(known), "hotplug_monitor_device_stale", device=A) == 0


def test_xids_are_counted_by_xid_across_patches_and_daemon_restarts() -> None:
    known = Known()

    actions = {13: "RESTART_APP", 48: "WORKFLOW_XID_48", 79: "RESTART_BM"}

    def xids(count: int, last: int) -> Mirror:
        attributes = {
            "xid_count": attribute(count),
            "last_xid": attribute(last),
            "last_xid_action": attribute(actions[last]),
        }
        return mirror(gpu(A, attributes=attributes))

    known.snapshot(mirror(gpu(A)))
    known.snapshot(xids(1, 79))
    known.snapshot(xids(2, 13))
    known.snapshot(xids(3, 79))
    known.snapshot(xids(1, 48))  # the daemon restarted: its count began again
    found = scrape(known)["hotplug_monitor_device_xids_total"]
    assert found == {  # a daemon that does not name the source had NVML alone
        (("action", "RESTART_APP"), ("device", A), ("source", "nvml"), ("xid", "13")): 1,
        (("action", "WORKFLOW_XID_48"), ("device", A), ("source", "nvml"), ("xid", "48")): 1,
        (("action", "RESTART_BM"), ("device", A), ("source", "nvml"), ("xid", "79")): 2,
    }


def test_xids_are_counted_by_the_source_that_reported_them() -> None:
    known = Known()

    def xids(count: int, last: int, source: str) -> Mirror:
        attributes = {"xid_count": attribute(count), "last_xid": attribute(last)}
        attributes["last_xid_source"] = attribute(source)
        return mirror(gpu(A, attributes=attributes))

    known.snapshot(mirror(gpu(A)))
    known.snapshot(xids(1, 79, "kmsg"))
    known.snapshot(xids(2, 79, "nvml"))
    known.snapshot(xids(3, 13, "\x1b[2J"))  # not a source: taken for NVML's
    found = scrape(known)["hotplug_monitor_device_xids_total"]
    assert found == {
        (("action", ""), ("device", A), ("source", "kmsg"), ("xid", "79")): 1,
        (("action", ""), ("device", A), ("source", "nvml"), ("xid", "79")): 1,
        (("action", ""), ("device", A), ("source", "nvml"), ("xid", "13")): 1,
    }


def test_a_reserved_device_that_left_the_host_is_shown_absent() -> None:
    known = Known()
    gone = {"id": GONE, "healthy": False, "health_desc": "removed", "hw_locality": {},
            "attributes": {}, "reserved_by": "r-2", "reserved_owner": "kubelet"}  # fmt: skip
    known.snapshot(mirror(gpu(A), gone))
    found = scrape(known)
    assert one(found, "hotplug_monitor_device_present", device=GONE) == 0
    assert one(found, "hotplug_monitor_device_present", device=A) == 1
    assert one(found, "hotplug_monitor_device_reserved", device=GONE, owner="kubelet") == 1


# --- hostile input ---------------------------------------------------------------------------


def test_what_is_not_what_the_protocol_says_is_left_out() -> None:
    known = Known()
    bad = gpu(B, attributes={"driver": attribute('evil"\n} 1\nx{'), "uuid": {"value": ["x"]}})
    known.snapshot(
        Mirror(
            {
                "generation": 1,
                "snapshot": {
                    "groups": {
                        H100: {**mirror(gpu(A), bad).snapshot["groups"][H100]},
                        "broken": "not a group",
                        "x" * 10_000: {"vendor": "y" * 10_000, "devices": {"not-an-address": {}}},
                    }
                },
            }
        )
    )
    known.stats(
        {
            "time": "now",
            "devices": {
                A: {
                    "Temperature": {"value": math.nan},
                    "Power usage": {"value": True},
                    "Memory state": {"value": math.inf},
                    "Throttle reasons": {"value": 7},
                    "Nonsense": {"value": 1},
                },
                B: "not a sample",
                "0000:00:00.0": {"Temperature": {"value": 1}},  # not a device the daemon shows
            },
        }
    )
    known.counters({**STATUS, "uevents": -1, "leases": 1.5, "resyncs": {"Bad Cause": 1, "x": "y"},
                    "publish_latency_seconds": {"buckets": [[1, 5], [0.5, 6]], "sum": 1,
                                                "count": 6}})  # fmt: skip
    found = scrape(known)
    assert set(found["hotplug_monitor_device_healthy"]) == {(("device", A),), (("device", B),)}
    driver = {dict(k)["device"]: dict(k)["driver"] for k in found["hotplug_monitor_device_info"]}
    assert driver[B] == 'evil"} 1x{'  # printable, escaped by the exposition, one sample
    for name in (
        "temperature_celsius",
        "power_watts",
        "memory_used_bytes",
        "clock_throttle_reason",
    ):
        assert f"hotplug_monitor_device_{name}" not in found
    assert "hotplug_monitor_stats_timestamp_seconds" not in found
    assert "hotplug_monitor_uevents_total" not in found
    assert "hotplug_monitor_leases" not in found
    assert "hotplug_monitor_resyncs_total" not in found
    assert "hotplug_monitor_publish_latency_seconds_bucket" not in found
    assert one(found, "hotplug_monitor_subscribers") == 3


def test_sizes_are_bounded() -> None:
    known = Known()
    many = [gpu(f"0000:{i // 256:02x}:{i % 256 // 8:02x}.{i % 8}") for i in range(MAX_DEVICES + 50)]
    known.snapshot(mirror(*many))
    assert len(known.devices) == MAX_DEVICES
    known = Known()
    known.snapshot(mirror(gpu(A, attributes={"driver": attribute("d" * 10_000)})))
    assert len(known.devices[A].driver) == MAX_TEXT
    for xid in range(MAX_XIDS + 10):
        known.snapshot(
            mirror(gpu(A, attributes={"xid_count": attribute(xid + 1), "last_xid": attribute(xid)}))
        )
    assert len(known.xids[A]) == MAX_XIDS


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=30,
)
ADDRESSES = st.sampled_from([A, B, GONE, "bogus"])


@given(
    groups=st.dictionaries(
        st.text(max_size=30),
        st.fixed_dictionaries(
            {
                "vendor": JSON,
                "type": JSON,
                "name": JSON,
                "devices": st.dictionaries(ADDRESSES, JSON),
            }
        )
        | JSON,
        max_size=3,
    ),
    sampled=st.dictionaries(
        ADDRESSES, st.dictionaries(st.sampled_from(sorted(stats.BY_NAME)), JSON)
    ),
    status=st.dictionaries(
        st.sampled_from(sorted(STATUS)), JSON | st.sampled_from(list(STATUS.values()))
    ),
)
def test_any_answer_gives_an_exposition_prometheus_can_read(
    groups: dict[str, Any], sampled: dict[str, Any], status: dict[str, Any]
) -> None:
    known = Known()
    known.snapshot(Mirror({"generation": 1, "snapshot": {"groups": groups}}))
    known.stats({"time": 1.0, "devices": sampled})
    known.counters(status)
    for family in text_string_to_metric_families(metrics.render(known).decode()):
        for s in family.samples:
            assert math.isfinite(s.value) or s.labels.get("le") == "+Inf", s
            assert all(len(v) <= 2 * MAX_TEXT for v in s.labels.values())


# --- what else is written in one place -------------------------------------------------------


def test_the_xid_alerts_name_only_the_catalogs_actions() -> None:
    # Changed with NVIDIA's catalog (issue 34): the alerts match actions, not XID lists.
    rules = (ROOT / "prometheus" / "hotplug-monitor.rules.yml").read_text()
    named = {
        a for found in re.findall(r'action=~?"([A-Z0-9_|]+)"', rules) for a in found.split("|")
    }
    assert {"RESET_GPU", "RESTART_BM", "RESTART_APP"} <= named <= set(ACTIONS)


def test_the_docs_list_every_metric_the_code_defines() -> None:
    section = (ROOT / "docs" / "prometheus.md").read_text()
    rows = re.findall(
        r"^\| `(hotplug_monitor_[a-z0-9_]+)` \| ([a-z]+) \| ([^|]*) \|", section, re.M
    )
    assert [name for name, _, _ in rows] == [spec.name for spec in metrics.METRICS]
    for (name, kind, labels), spec in zip(rows, metrics.METRICS, strict=True):
        assert kind == spec.kind, name
        assert re.findall(r"`([a-z_]+)`", labels) == list(spec.labels), name


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("localhost:10082", ("localhost", 10082)),
        ("0.0.0.0:9", ("0.0.0.0", 9)),
        ("[::1]:10082", ("::1", 10082)),
        (":10082", ("", 10082)),
    ],
)
def test_listen_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["localhost", "localhost:0", "host:99999", "::1:80", "h:x"])
def test_listen_addresses_refused(text: str) -> None:
    with pytest.raises(ValueError, match="--listen"):
        parse_listen(text)


def test_a_shared_gpus_replicas_show_each_holder_and_its_telemetry_once() -> None:
    replicas = [
        gpu(f"{A}::0", reserved_by="r-1", reserved_owner="kubelet"),
        gpu(f"{A}::1", reserved_by="r-2"),
        gpu(f"{A}::2"),
    ]
    for replica in replicas:
        replica["hw_locality"] = {"pci_bus_id": A}
        replica["attributes"]["uuid"] = attribute(UUID)
    known = Known()
    known.snapshot(mirror(*replicas))
    known.stats(sample(**{A.replace(":", "_"): {"Power usage": 400.0}}))
    found = scrape(known)
    reserved = "hotplug_monitor_device_reserved"
    assert one(found, reserved, device=f"{A}::0", owner="kubelet") == 1
    assert one(found, reserved, device=f"{A}::1", owner="") == 1
    assert one(found, reserved, device=f"{A}::2", owner="") == 0
    assert one(found, "hotplug_monitor_device_healthy", device=f"{A}::2") == 1
    power = found["hotplug_monitor_device_power_watts"]
    assert power == {(("device", f"{A}::0"),): 400.0}  # once per GPU: sums stay right

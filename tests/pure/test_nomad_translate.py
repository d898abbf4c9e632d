"""The Nomad plugin's decisions by plain calls: its settings (config block and flags), the
snapshot as Nomad's device groups, reservations, refusals, statistics, and the throttle that
makes a burst of changes one Fingerprint message."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import grpc
import msgpack
import pytest

from monitor.adapters import grpc_edge
from monitor.adapters.nomad import config, translate
from monitor.adapters.nomad.config import ConfigRefused, Overrides, PluginConfig
from monitor.adapters.nomad.daemon_view import throttle_delay
from monitor.wire import errors, stats
from monitor.wire.paths import SYSTEM_SOCKET
from monitor.wire.snapshot import GroupPattern

A, B, C = "0000:3b:00.0", "0000:86:00.0", "0000:af:00.0"
UUID_A = "GPU-0a0a0a0a-1111-2222-3333-444444444444"
H100 = "NVIDIA H100 80GB HBM3"


def gpu(address: str, uuid: str, power: int = 700, **extra: Any) -> dict[str, Any]:
    return {
        "id": address,
        "healthy": True,
        "health_desc": "",
        "hw_locality": {"pci_bus_id": address},
        "attributes": {
            "uuid": {"value": uuid},
            "memory": {"value": 81559, "unit": "MiB"},
            "power": {"value": power, "unit": "W"},
            "driver_version": {"value": "550.54.15"},
            "numa_node": {"value": 0},
        },
        **extra,
    }


def snapshot(*devices: dict[str, Any]) -> dict[str, Any]:
    return {
        "groups": {
            f"nvidia/gpu/{H100}": {
                "vendor": "nvidia",
                "type": "gpu",
                "name": H100,
                "attributes": {"memory": {"value": 81559, "unit": "MiB"}},
                "devices": {d["id"]: d for d in devices},
            },
            "amd/gpu/MI300X": {
                "vendor": "amd",
                "type": "gpu",
                "name": "MI300X",
                "attributes": {"driver": {"value": "amdgpu"}},
                "devices": {
                    C: {
                        "id": C,
                        "healthy": True,
                        "health_desc": "",
                        "hw_locality": {"pci_bus_id": C},
                        "attributes": {"driver": {"value": "amdgpu"}},
                    }
                },
            },
        }
    }


TWO_H100 = snapshot(gpu(A, UUID_A), gpu(B, "GPU-0b0b0b0b-5555-6666-7777-888888888888"))


def devices(offer: translate.Offered) -> dict[str, Any]:
    return {d.ID: d for g in offer.groups for d in g.devices}


# -- settings ---------------------------------------------------------------------------------


def packed(value: Any) -> bytes:
    return bytes(msgpack.packb(value))


def test_defaults_without_a_config_block_or_flags() -> None:
    settled = config.settle(config.decode(b""), Overrides())
    assert settled == PluginConfig(socket=SYSTEM_SOCKET, ignored=frozenset(), groups=())
    # What Nomad sends when the block is empty: our schema's defaults.
    decoded = config.decode(packed({"socket": "", "ignored_device_ids": [], "groups": []}))
    assert config.settle(decoded) == settled


def test_flags_win_over_the_config_block() -> None:
    block = config.decode(
        packed({"socket": "/run/a.sock", "ignored_device_ids": [A], "groups": ["gpu"]})
    )
    assert config.settle(block).socket == Path("/run/a.sock")
    flags = config.flags_from(Path("/run/b.sock"), [B.upper()], None)
    settled = config.settle(block, flags)
    assert settled.socket == Path("/run/b.sock")
    assert settled.ignored == {B}  # upper case taken, kept as the daemon writes it
    assert settled.groups == (GroupPattern("gpu"),)  # no --offer: the block's


@pytest.mark.parametrize(
    ("block", "says"),
    [
        ({"socket": "relative.sock"}, "socket must be an absolute path, not 'relative.sock'"),
        ({"socket": "/" + "s" * 200}, "longer than a Unix socket allows"),
        ({"socket": 5}, "socket must be a string"),
        ({"ignored_device_ids": ["3b:00.0"]}, "'3b:00.0' is neither a PCI address"),
        ({"ignored_device_ids": "0000:3b:00.0"}, "ignored_device_ids must be a list of strings"),
        ({"groups": ["nvidia//x"]}, "'nvidia//x' is not TYPE, VENDOR/TYPE or VENDOR/TYPE/NAME"),
        ({"groups": [""]}, "is not TYPE"),
        ({"fingerprint_period": "1m"}, "unknown config keys: fingerprint_period"),
    ],
)
def test_a_bad_setting_is_refused_with_a_sentence_naming_it(
    block: dict[str, Any], says: str
) -> None:
    with pytest.raises(ConfigRefused, match=None) as refused:
        config.settle(config.decode(packed(block)))
    assert says in str(refused.value)


def test_bad_msgpack_and_a_bad_flag_are_refused() -> None:
    with pytest.raises(ConfigRefused, match="not valid MessagePack"):
        config.decode(b"\xc1")
    with pytest.raises(ConfigRefused, match="must be a map"):
        config.decode(packed([1, 2]))
    with pytest.raises(ConfigRefused, match="absolute path"):
        config.settle({}, Overrides(socket=Path("here.sock")))


def test_group_patterns_match_as_a_jobs_device_name_does() -> None:
    any_gpu, nvidia_gpu, h100 = (
        GroupPattern.parse(t) for t in ("gpu", "nvidia/gpu", f"nvidia/gpu/{H100}")
    )
    assert any_gpu.matches("amd", "gpu", "MI300X") and any_gpu.matches("nvidia", "gpu", H100)
    assert not any_gpu.matches("nvidia", "accelerator", "X")
    assert nvidia_gpu.matches("nvidia", "gpu", "anything") and not nvidia_gpu.matches(
        "amd", "gpu", "X"
    )
    assert h100.matches("nvidia", "gpu", H100) and not h100.matches("nvidia", "gpu", "A100")
    assert str(h100) == f"nvidia/gpu/{H100}"


# -- the snapshot as Nomad's device groups -----------------------------------------------------


def test_groups_with_nomads_names_attributes_and_units() -> None:
    offer = translate.offered(TWO_H100, PluginConfig())
    by_name = {g.device_name: g for g in offer.groups}
    assert set(by_name) == {H100, "MI300X"}
    h100 = by_name[H100]
    assert (h100.vendor, h100.device_type) == ("nvidia", "gpu")
    attributes = h100.attributes
    assert (attributes["memory"].int_val, attributes["memory"].unit) == (81559, "MiB")
    assert (attributes["power"].int_val, attributes["power"].unit) == (700, "W")
    assert attributes["driver_version"].string_val == "550.54.15"
    assert attributes["numa_node"].int_val == 0
    assert "uuid" not in attributes  # differs per GPU, and Nomad has no per-device attributes
    assert [d.ID for d in h100.devices] == [A, B]
    assert all(d.healthy and d.hw_locality.pci_bus_id == d.ID for d in h100.devices)
    assert offer.by_device == {
        A: ("nvidia", "gpu", H100),
        B: ("nvidia", "gpu", H100),
        C: ("amd", "gpu", "MI300X"),
    }
    assert offer.skipped == ()


def test_an_attribute_that_differs_within_the_group_is_left_out() -> None:
    offer = translate.offered(
        snapshot(gpu(A, UUID_A, power=700), gpu(B, "GPU-b", power=450)), PluginConfig()
    )
    h100 = next(g for g in offer.groups if g.device_name == H100)
    assert "power" not in h100.attributes and "memory" in h100.attributes


def test_held_outside_nomad_is_unhealthy_naming_the_holder_and_nomads_own_stays_healthy() -> None:
    held = snapshot(
        gpu(A, UUID_A, reserved_by="r-7", reserved_owner="kubelet"),
        gpu(B, "GPU-b", reserved_by="r-8"),
        gpu("0000:c0:00.0", "GPU-c", reserved_by="r-9", reserved_owner="nomad"),
    )
    found = devices(translate.offered(held, PluginConfig()))
    assert not found[A].healthy
    assert found[A].health_description == "reserved outside Nomad (reservation r-7, owner kubelet)"
    assert not found[B].healthy
    assert found[B].health_description == "reserved outside Nomad (reservation r-8)"
    assert found["0000:c0:00.0"].healthy


def test_unhealthy_keeps_the_daemons_sentence_and_adds_the_holder() -> None:
    broken = gpu(
        A, UUID_A, healthy=False, health_desc="PCI error: recovery in progress, device offline"
    )
    broken["reserved_by"] = "r-1"
    found = devices(translate.offered(snapshot(broken), PluginConfig()))
    assert not found[A].healthy
    assert found[A].health_description == (
        "PCI error: recovery in progress, device offline; reserved outside Nomad (reservation r-1)"
    )


def test_ignored_devices_by_address_or_uuid_and_groups_not_offered_are_left_out() -> None:
    by_uuid = PluginConfig(ignored=frozenset({UUID_A}))
    offer = translate.offered(snapshot(gpu(A, UUID_A, power=1), gpu(B, "GPU-b", power=2)), by_uuid)
    assert set(devices(offer)) == {B, C}
    h100 = next(g for g in offer.groups if g.device_name == H100)
    # The group's attributes are those of the devices offered: B's power is now common.
    assert h100.attributes["power"].int_val == 2
    only_nvidia = PluginConfig(ignored=frozenset({B}), groups=(GroupPattern.parse("nvidia/gpu"),))
    assert set(devices(translate.offered(TWO_H100, only_nvidia))) == {A}
    # A group left with no device is not sent at all.
    none_left = PluginConfig(ignored=frozenset({A, B}))
    assert [g.device_name for g in translate.offered(TWO_H100, none_left).groups] == ["MI300X"]


@pytest.mark.parametrize(
    ("attribute", "kept"),
    [
        ({"value": 5, "unit": "GT/s"}, False),  # a unit Nomad does not know
        ({"value": "fast", "unit": "MHz"}, False),  # a unit on a string
        ({"value": True, "unit": "W"}, False),
        ({"value": 1 << 70}, False),  # beyond int64
        ({"value": math.nan}, False),
        ({"value": "line\nbreak"}, False),
        ({"value": ["a"]}, False),
        ("5", False),
        ({"value": 2.5, "unit": "GHz"}, True),
        ({"value": False}, True),
    ],
)
def test_an_attribute_nomad_would_refuse_is_left_out_and_named(attribute: Any, kept: bool) -> None:
    weird = copy.deepcopy(TWO_H100)
    for device in weird["groups"][f"nvidia/gpu/{H100}"]["devices"].values():
        device["attributes"]["odd"] = attribute
    offer = translate.offered(weird, PluginConfig())
    h100 = next(g for g in offer.groups if g.device_name == H100)
    assert ("odd" in h100.attributes) is kept
    assert any("'odd'" in reason for reason in offer.skipped) is not kept
    assert "memory" in h100.attributes  # the others are untouched


def test_malformed_entries_are_skipped_and_the_rest_offered() -> None:
    bad = copy.deepcopy(TWO_H100)
    bad["groups"]["x"] = {"vendor": "", "type": "gpu", "name": "n", "devices": {}}
    bad["groups"]["y"] = "not an object"
    bad["groups"][f"nvidia/gpu/{H100}"]["devices"]["bad id\n"] = gpu("bad id\n", "u")
    bad["groups"][f"nvidia/gpu/{H100}"]["devices"]["0000:d0:00.0"] = ["not", "a", "device"]
    offer = translate.offered(bad, PluginConfig())
    assert set(devices(offer)) == {A, B, C}
    assert len(offer.skipped) == 4
    assert translate.offered("nonsense", PluginConfig()).groups == ()
    assert translate.offered({"groups": []}, PluginConfig()).groups == ()


def test_daemon_not_reachable_keeps_the_devices_unhealthy() -> None:
    offer = translate.offered(TWO_H100, PluginConfig())
    down = translate.unreachable(offer)
    assert set(devices(down)) == set(devices(offer))
    assert all(
        not d.healthy and d.health_description == translate.UNREACHABLE
        for d in devices(down).values()
    )
    assert all(d.healthy for d in devices(offer).values())  # the original is not changed
    assert not translate.same(down.groups, offer.groups)
    assert translate.same(translate.offered(TWO_H100, PluginConfig()).groups, offer.groups)


def test_not_offered_says_why_or_leaves_it_to_the_daemon() -> None:
    only_amd = PluginConfig(groups=(GroupPattern.parse("amd/gpu"),), ignored=frozenset({UUID_A}))
    assert translate.not_offered(A, TWO_H100, only_amd) == (
        f"{A} is not offered to Nomad: its UUID is in ignored_device_ids"
    )
    assert translate.not_offered(B, TWO_H100, only_amd) == (
        f"{B} is not offered to Nomad: group nvidia/gpu/{H100} is not in groups"
    )
    assert translate.not_offered(C, TWO_H100, only_amd) is None
    assert translate.not_offered("0000:00:00.0", TWO_H100, only_amd) is None  # the daemon says
    assert "ignored_device_ids" in (
        translate.not_offered(A, None, PluginConfig(ignored=frozenset({A}))) or ""
    )


# -- reservations and refusals ----------------------------------------------------------------


def test_a_reservation_becomes_the_container_edits() -> None:
    answer = {
        "reservation_id": "r-1",
        "device_ids": [A],
        "envs": {"NVIDIA_VISIBLE_DEVICES": UUID_A},
        "mounts": [
            {
                "task_path": "/dev/dri/by-path/x",
                "host_path": "/dev/dri/by-path/x",
                "read_only": True,
            }
        ],
        "devices": [
            {"task_path": "/dev/nvidia0", "host_path": "/dev/nvidia0", "cgroup_perms": "rwm"}
        ],
    }
    edits = translate.container_reservation(answer)
    assert dict(edits.envs) == {"NVIDIA_VISIBLE_DEVICES": UUID_A}
    assert [(m.task_path, m.host_path, m.read_only) for m in edits.mounts] == [
        ("/dev/dri/by-path/x", "/dev/dri/by-path/x", True)
    ]
    assert [(d.host_path, d.permissions) for d in edits.devices] == [("/dev/nvidia0", "rwm")]


def test_the_daemons_refusals_as_grpc_statuses_with_its_sentence() -> None:
    cases = {
        errors.UNKNOWN_DEVICE: grpc.StatusCode.NOT_FOUND,
        errors.DEVICE_UNHEALTHY: grpc.StatusCode.FAILED_PRECONDITION,
        errors.DEVICE_RESERVED: grpc.StatusCode.FAILED_PRECONDITION,
        errors.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
        errors.INTERNAL_ERROR: grpc.StatusCode.INTERNAL,
    }
    for code, status in cases.items():
        assert grpc_edge.status_for(errors.RpcError(code, "A sentence.")) == (status, "A sentence.")
    assert (
        grpc_edge.status_for(errors.RpcError(-32001, "bad\x1b[2J"))[1]
        == "the daemon refused (code -32001)"
    )


# -- statistics -------------------------------------------------------------------------------


def test_a_stats_sample_as_nomads_stat_objects_grouped_like_the_fingerprint() -> None:
    offer = translate.offered(TWO_H100, PluginConfig(ignored=frozenset({B})))
    sample = {
        "time": 1_800_000_000.25,
        "devices": {
            A: {
                stats.GPU_UTILIZATION.name: {"value": 37, "unit": "%"},
                stats.POWER_USAGE.name: {"value": 312.5, "unit": "W"},
                stats.MEMORY_USED.name: {"value": 2048, "unit": "MiB"},
                stats.MEMORY_TOTAL.name: {"value": 81559, "unit": "MiB"},
                stats.BAR1_USED.name: {"value": 1.5, "unit": "MiB"},
                stats.BAR1_TOTAL.name: {"value": 131072, "unit": "MiB"},
                "Throttle reasons": {"value": "", "unit": ""},
                "bad": {"value": [1]},
            },
            B: {stats.GPU_UTILIZATION.name: {"value": 1, "unit": "%"}},  # ignored
            "0000:00:00.0": {stats.GPU_UTILIZATION.name: {"value": 1, "unit": "%"}},  # unknown
        },
    }
    response = translate.stats_response(sample, offer)
    assert [(g.vendor, g.type, g.name) for g in response.groups] == [("nvidia", "gpu", H100)]
    instance = response.groups[0].instance_stats
    assert set(instance) == {A}
    got = instance[A]
    assert got.timestamp.ToNanoseconds() == 1_800_000_000_250_000_000
    values = got.stats.attributes
    assert values[stats.GPU_UTILIZATION.name].int_numerator_val.value == 37
    assert values[stats.GPU_UTILIZATION.name].unit == "%"
    assert values[stats.GPU_UTILIZATION.name].desc == stats.GPU_UTILIZATION.help
    assert values[stats.POWER_USAGE.name].float_numerator_val.value == 312.5
    memory = values[stats.MEMORY_USED.name]
    assert (memory.int_numerator_val.value, memory.int_denominator_val.value) == (2048, 81559)
    assert got.summary == memory  # memory used of total, as Nomad's NVIDIA plugin summarises
    bar1 = values[stats.BAR1_USED.name]  # a float of an int: a float fraction
    assert (bar1.float_numerator_val.value, bar1.float_denominator_val.value) == (1.5, 131072.0)
    assert values["Throttle reasons"].HasField("string_val")
    assert "bad" not in values


def test_stats_of_nothing_usable_are_an_empty_response() -> None:
    offer = translate.offered(TWO_H100, PluginConfig())
    assert translate.stats_response("x", offer).groups == []
    assert translate.stats_response({"time": "now", "devices": {A: {}}}, offer).groups == []


# -- coalescing -------------------------------------------------------------------------------


def test_a_lone_change_goes_at_once_and_a_burst_waits_for_the_window() -> None:
    assert throttle_delay(now=10.0, last_sent=9.0, window=0.005) == 0.0
    assert throttle_delay(now=10.0, last_sent=-math.inf, window=0.005) == 0.0
    assert throttle_delay(now=10.002, last_sent=10.0, window=0.005) == pytest.approx(0.003)
    assert throttle_delay(now=10.005, last_sent=10.0, window=0.005) == 0.0

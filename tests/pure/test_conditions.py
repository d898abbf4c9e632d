"""Health conditions NVML reports: the policy table, its rule, and what each consumer sees."""

from __future__ import annotations

import logging
from typing import Any

import attrs
import pytest

from monitor.adapters.exporter.known import Known
from monitor.adapters.kubelet.inventory import inventory
from monitor.adapters.kubelet.options import Options
from monitor.adapters.nomad import translate
from monitor.adapters.nomad.config import PluginConfig
from monitor.core.conditions import NAMES, HealthPolicy, judge_condition
from monitor.core.events import DeviceSeen, GpuConditions, HealthPolicyChanged
from monitor.core.health import HEALTHY, NEEDS_RESET, UNHEALTHY
from monitor.core.state import State
from monitor.core.transitions import HealthTransition, LeaseWarning, journal_entries
from monitor.outputs.logs import report
from monitor.wire.conditions import parse_conditions
from monitor.wire.mirror import Mirror
from tests.pure.examples import H100, ROOT, decide, device_json, reserve, run
from tests.pure.test_exporter import one, scrape
from tests.pure.test_nvidia import named

A = H100.address


@pytest.mark.parametrize(
    ("name", "health", "desc"),
    [
        ("row_remap_failed", UNHEALTHY, "row remapping failed: replace the GPU"),
        (
            "row_remap_pending",
            NEEDS_RESET,
            "GPU needs a reset: pending row remapping; recovery: reset the GPU",
        ),
        (
            "page_retirement_pending",
            NEEDS_RESET,
            "GPU needs a reset: pending page retirement; recovery: reset the GPU",
        ),
        ("volatile_ecc_uncorrected", NEEDS_RESET, "GPU needs a reset: uncorrectable ECC errors"),
        ("nvlink_down", NEEDS_RESET, "GPU needs a reset: an NVLink is down"),
        ("pcie_replay_storm", NEEDS_RESET, "GPU needs a reset: PCIe replays at 8 a minute"),
        ("pcie_replays", HEALTHY, "PCIe replays: reported, the GPU stays schedulable"),
        ("thermal_slowdown", HEALTHY, "hardware thermal slowdown: reported"),
        ("power_brake", HEALTHY, "hardware power brake slowdown: reported"),
    ],
)
def test_the_policy_table(name: str, health: str, desc: str) -> None:
    verdict = judge_condition(name, HealthPolicy())
    assert (verdict.health, verdict.decided_by) == (health, "policy")
    assert verdict.desc.startswith(desc)


def test_every_condition_is_in_the_table_once() -> None:
    assert len(NAMES) == len(set(NAMES)) == 9


def test_the_operator_ignores_or_drains_a_condition_and_an_unknown_one_drains() -> None:
    policy = HealthPolicy(ignore=frozenset({"row_remap_pending"}), fatal=frozenset({"power_brake"}))
    ignored = judge_condition("row_remap_pending", policy)
    assert (ignored.health, ignored.decided_by) == (HEALTHY, "health_ignore")
    assert ignored.desc.endswith("(health_ignore)")
    fatal = judge_condition("power_brake", policy)
    assert (fatal.health, fatal.decided_by, fatal.todo) == (
        NEEDS_RESET,
        "health_fatal",
        "reset the GPU",
    )
    # fatal never makes a condition milder
    assert (
        judge_condition(
            "row_remap_failed", HealthPolicy(fatal=frozenset({"row_remap_failed"}))
        ).health
        == UNHEALTHY
    )
    assert judge_condition("from_a_newer_worker", HealthPolicy()).health == NEEDS_RESET
    assert "links 2, 5" in judge_condition("nvlink_down", HealthPolicy(), "links 2, 5").desc


def test_a_pending_remap_drains_the_gpu_and_its_end_after_a_reset_says_why() -> None:
    state = named()
    reduction = decide(state, GpuConditions(A, {"row_remap_pending": ""}))
    shown = device_json(reduction.state, A)
    assert (shown["healthy"], shown["health"]) == (False, NEEDS_RESET)
    assert (
        shown["health_desc"] == "GPU needs a reset: pending row remapping; recovery: reset the GPU"
    )
    assert shown["attributes"]["health_conditions"] == {"value": "row_remap_pending=needs reset"}
    # the same conditions again: nothing changes, no patch
    assert decide(reduction.state, GpuConditions(A, {"row_remap_pending": ""})).patch is None
    recovered = decide(reduction.state, GpuConditions(A, {}))
    shown = device_json(recovered.state, A)
    assert shown["healthy"] is True and "health_conditions" not in shown["attributes"]
    assert recovered.recoveries == {A: "NVML no longer reports pending row remapping"}


def test_a_failed_remap_is_unhealthy_the_worst_wins_and_reported_ones_stay_schedulable() -> None:
    state, _ = run(
        GpuConditions(A, {"row_remap_failed": "", "page_retirement_pending": ""}), state=named()
    )
    shown = device_json(state, A)
    assert (shown["healthy"], shown["health"]) == (False, UNHEALTHY)
    assert shown["health_desc"] == (
        "row remapping failed: replace the GPU; "
        "GPU needs a reset: pending page retirement; recovery: reset the GPU"
    )
    state, _ = run(GpuConditions(A, {"thermal_slowdown": "", "power_brake": ""}), state=state)
    shown = device_json(state, A)
    assert shown["healthy"] is True
    assert shown["attributes"]["health_conditions"]["value"] == (
        "power_brake=reported,thermal_slowdown=reported"
    )


def test_a_new_health_policy_judges_the_conditions_again() -> None:
    state, _ = run(GpuConditions(A, {"thermal_slowdown": ""}), state=named())
    assert device_json(state, A)["healthy"] is True
    fatal = HealthPolicy(fatal=frozenset({"thermal_slowdown"}))
    state, _ = run(HealthPolicyChanged(fatal), state=state)
    assert device_json(state, A)["health"] == NEEDS_RESET
    reduction = decide(state, HealthPolicyChanged(HealthPolicy()))
    assert device_json(reduction.state, A)["healthy"] is True
    assert reduction.recoveries == {
        A: "the health policy no longer drains a GPU on hardware thermal slowdown"
    }


def test_conditions_belong_to_a_gpu_bound_to_nvidia_and_a_rebind_forgets_them() -> None:
    unbound = State(nvml_names=True)
    state, _ = run(DeviceSeen(attrs.evolve(H100, driver="vfio-pci")), state=unbound)
    assert decide(state, GpuConditions(A, {"row_remap_failed": ""})).state.conditions == {}
    state, _ = run(GpuConditions(A, {"row_remap_failed": ""}), state=named())
    state, _ = run(DeviceSeen(attrs.evolve(H100, driver=None)), state=state)
    assert A not in state.conditions


def test_the_alert_names_the_condition_and_the_leases_holding_the_gpu(
    caplog: pytest.LogCaptureFixture,
) -> None:
    state, _ = run(reserve(A, peer=ROOT, owner="nomad"), state=named())
    reduction = decide(state, GpuConditions(A, {"page_retirement_pending": ""}))
    entries = journal_entries(state, reduction)
    alert = next(e for e in entries if isinstance(e, HealthTransition))
    assert alert.kind == "unhealthy" and "pending page retirement" in alert.health_desc
    assert alert.conditions == ("page_retirement_pending",)
    assert alert.holders == ("reservation lease-1 (owner nomad, uid 0, pid 1)",)
    warning = next(e for e in entries if isinstance(e, LeaseWarning))
    assert warning.lease.id == "lease-1"  # the lease's own warning, as for any cause
    with caplog.at_level(logging.INFO):
        report(logging.getLogger("t"), alert)
    record = caplog.records[-1]
    assert "held by reservation lease-1 (owner nomad" in record.getMessage()
    fields: dict[str, Any] = record.journal  # type: ignore[attr-defined]
    assert fields["HEALTH_CONDITIONS"] == "page_retirement_pending"
    assert fields["LEASE_HOLDERS"].startswith("reservation lease-1")


def _snapshot(conditions: dict[str, str]) -> dict[str, Any]:
    state, _ = run(GpuConditions(A, conditions), state=named())
    snapshot: dict[str, Any] = state.fingerprint.to_json()
    return snapshot


def test_kubelet_and_nomad_take_the_gpu_out_with_the_description() -> None:
    snapshot = _snapshot({"row_remap_pending": ""})
    kube = [
        d
        for r in inventory(snapshot, Options()).resources
        for d in inventory(snapshot, Options()).devices(r)
    ]
    assert [(d.id, d.healthy, d.why) for d in kube] == [
        (A, False, "GPU needs a reset: pending row remapping; recovery: reset the GPU")
    ]
    offered = translate.offered(snapshot, PluginConfig())
    nomad = {d.ID: d for g in offered.groups for d in g.devices}
    assert not nomad[A].healthy
    assert nomad[A].health_description.startswith("GPU needs a reset: pending row remapping")
    healthy = _snapshot({"thermal_slowdown": ""})
    assert all(
        d.healthy for g in translate.offered(healthy, PluginConfig()).groups for d in g.devices
    )


def test_the_exporter_shows_each_condition_with_its_verdict() -> None:
    known = Known()
    known.snapshot(
        Mirror(
            {"generation": 1, "snapshot": _snapshot({"row_remap_failed": "", "pcie_replays": ""})}
        )
    )
    found = scrape(known)
    metric = "hotplug_monitor_device_health_condition"
    assert one(found, metric, device=A, condition="row_remap_failed", verdict="unhealthy") == 1
    assert one(found, metric, device=A, condition="pcie_replays", verdict="reported") == 1
    assert len(found[metric]) == 2
    assert one(found, "hotplug_monitor_device_health", device=A, state="unhealthy") == 1


def test_the_attribute_is_read_back_leaving_out_what_is_not_in_its_form() -> None:
    assert parse_conditions("a_b=needs reset,c=reported,D=unhealthy,e=bad,f") == {
        "a_b": "needs reset",
        "c": "reported",
    }
    assert parse_conditions(7) == {}

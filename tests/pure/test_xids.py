"""NVIDIA's XID catalog through the core's fold: every XID's verdict, the driver's recovery
action over the catalog, the operator's overrides, and what each verdict does to leases."""

from __future__ import annotations

import pytest

from monitor.adapters.exporter.known import Known
from monitor.adapters.exporter.metrics import render
from monitor.adapters.kubelet.inventory import inventory
from monitor.adapters.kubelet.options import Options
from monitor.adapters.nomad.config import PluginConfig
from monitor.adapters.nomad.translate import offered
from monitor.core import xid_catalog as cat
from monitor.core.answers import Grant, Reason, Refusal
from monitor.core.events import DeviceSeen, NvmlEventReported, NvmlGpuSeen, XidReported
from monitor.core.state import State
from monitor.core.xids import (
    CATALOG,
    RECOVERY_ACTIONS,
    XidPolicy,
    judge,
)
from monitor.wire.mirror import Mirror
from tests.pure.examples import ACCESS, GPU, H100, decide, device_json, reserve, run

# What the catalog's immediate action means for the GPU, as the issue states it.
EXPECTED = {
    cat.RESTART_APP: None,
    cat.IGNORE: None,
    cat.WORKFLOW_XID_45: None,
    cat.XID_154: None,
    cat.RESET_GPU: "needs reset",
    cat.WORKFLOW_XID_48: "needs reset",
    cat.WORKFLOW_NVLINK_ERR: "needs reset",
    cat.WORKFLOW_NVLINK5_ERR: "needs reset",
    cat.RESTART_BM: "unhealthy",
    cat.RESTART_VM: "unhealthy",
    cat.CONTACT_SUPPORT: "needs reset",  # xid_unknown = drain, the default
    cat.CHECK_MECHANICALS: "needs reset",
    cat.UPDATE_SWFW: "needs reset",
    cat.CHECK_UVM: "needs reset",
}


def named() -> State:
    state, _ = run(DeviceSeen(H100), NvmlGpuSeen(GPU), state=State(nvml_names=True, access=ACCESS))
    return state


NAMED = named()


def test_the_catalog_is_whole_and_speaks_only_its_own_actions() -> None:
    assert sorted(CATALOG) == list(range(1, 163))
    assert {entry.action for entry in CATALOG.values()} <= set(cat.ACTIONS)
    assert set(EXPECTED) == set(cat.ACTIONS)
    # spot checks against NVIDIA's catalog
    assert CATALOG[109].action == cat.RESET_GPU and CATALOG[94].action == cat.RESTART_APP
    assert CATALOG[79].mnemonic == "ROBUST_CHANNEL_GPU_HAS_FALLEN_OFF_THE_BUS"
    assert CATALOG[1].action == cat.CONTACT_SUPPORT


@pytest.mark.parametrize("xid", sorted(CATALOG))
def test_every_catalog_xid_gets_its_actions_verdict_through_the_fold(xid: int) -> None:
    entry = CATALOG[xid]
    state, _ = run(XidReported(H100.address, xid), state=NAMED)
    device = device_json(state, H100.address)
    assert device["attributes"]["last_xid"] == {"value": xid}
    assert device["attributes"]["last_xid_action"] == {"value": entry.action}
    assert device.get("health") == EXPECTED[entry.action]
    assert device["healthy"] is (EXPECTED[entry.action] is None)
    if not device["healthy"]:
        assert device["health_desc"].startswith(f"XID {xid} ({entry.meaning}; NVIDIA: ")
        assert "recovery: re" in device["health_desc"]


def test_a_gpu_that_saw_only_restart_app_and_ignore_xids_can_still_be_reserved() -> None:
    harmless = [x for x, e in CATALOG.items() if e.action in (cat.RESTART_APP, cat.IGNORE)]
    state, _ = run(*(XidReported(H100.address, x) for x in harmless), state=NAMED)
    request = reserve(H100.address)
    answer = decide(state, request).answers[request.token]
    assert isinstance(answer, Grant)
    assert device_json(state, H100.address)["attributes"]["xid_count"] == {"value": len(harmless)}


def test_xid_109_takes_its_gpu_out_naming_a_reset_and_keeps_the_current_lease() -> None:
    request = reserve(H100.address)
    leased = decide(NAMED, request).state
    state, _ = run(XidReported(H100.address, 109), state=leased)
    device = device_json(state, H100.address)
    assert device["health"] == "needs reset" and "recovery: reset the GPU" in device["health_desc"]
    assert device["reserved_by"] == "lease-1"  # current lease kept
    again = reserve(H100.address, lease_id="lease-2")
    answer = decide(run(XidReported(H100.address, 109), state=NAMED)[0], again).answers[again.token]
    assert isinstance(answer, Refusal) and answer.reason is Reason.UNHEALTHY
    assert "XID 109" in answer.message and "needs a reset" in answer.message


@pytest.mark.parametrize("action", [*sorted(RECOVERY_ACTIONS), 99])
def test_each_recovery_action_decides_and_none_clears_what_needs_a_reset(action: int) -> None:
    state, _ = run(NvmlEventReported(H100.address, "recovery_action", action), state=NAMED)
    device = device_json(state, H100.address)
    name, health, _ = RECOVERY_ACTIONS.get(action, ("99", "needs reset", ""))
    assert device.get("health") == (None if health == "healthy" else health)
    if action:
        assert f"recovery action {name}" in device["health_desc"]
    state, _ = run(NvmlEventReported(H100.address, "recovery_action", 0), state=state)
    assert device_json(state, H100.address)["healthy"] is True


def test_the_drivers_action_wins_over_the_catalog_and_none_leaves_a_reboot() -> None:
    # RESTART_APP in the catalog, but the driver asks for a reboot
    state, _ = run(XidReported(H100.address, 13, source="kmsg", recovery_action=2), state=NAMED)
    assert device_json(state, H100.address)["health"] == "unhealthy"
    state, _ = run(XidReported(H100.address, 79), state=NAMED)
    state, _ = run(NvmlEventReported(H100.address, "recovery_action", 0), state=state)
    assert device_json(state, H100.address)["health"] == "unhealthy"  # until re-added


def test_operator_overrides_and_xid_unknown() -> None:
    assert judge(109, XidPolicy(ignore=frozenset({109}))).decided_by == "xid_ignore"
    fatal = judge(13, XidPolicy(fatal=frozenset({13})))
    assert (fatal.health, fatal.decided_by) == ("needs reset", "xid_fatal")
    assert judge(79, XidPolicy(fatal=frozenset({79}))).health == "unhealthy"
    report = judge(1, XidPolicy(unknown="report"))
    assert (report.health, report.decided_by) == ("healthy", "xid_unknown")
    unknown = judge(500, XidPolicy())
    assert unknown.health == "needs reset" and "not in NVIDIA's XID catalog" in unknown.desc
    assert judge(109, XidPolicy(), recovery_action=0).decided_by == "catalog"  # NONE: no word
    assert judge(13, XidPolicy(), recovery_action=7).decided_by == "driver"


def test_the_docs_xid_table_is_the_one_the_catalog_writes() -> None:
    from pathlib import Path

    from monitor.cli.xid_table import DOCS_PAGE, with_table

    page = (Path(__file__).parents[2] / DOCS_PAGE).read_text()
    assert page == with_table(page), "run python -m monitor.cli.xid_table"


def test_explain_xid_names_the_action_and_who_decided() -> None:
    from monitor.cli.xid_table import explain

    text = explain(109)
    assert "catalog action: RESET_GPU" in text and "verdict: needs reset" in text
    assert "decided by: xid_ignore" in explain(109, XidPolicy(ignore=frozenset({109})))
    assert "not in NVIDIA's XID catalog" in explain(4000)


@pytest.mark.parametrize(
    ("xid", "health"), [(13, "healthy"), (109, "needs reset"), (79, "unhealthy")]
)
def test_every_consumer_reads_the_verdict_from_the_daemons_snapshot(xid: int, health: str) -> None:
    """The snapshot one fold gives, as the kubelet plugin, the Nomad plugin and the exporter
    read it: a GPU that is not healthy is drained by each, and the exporter says which state."""
    state, _ = run(XidReported(H100.address, xid), state=NAMED)
    snapshot = state.fingerprint.to_json()
    schedulable = health == "healthy"
    [kube] = [d for r in inventory(snapshot, Options()).resources.values() for d in r]
    assert kube.healthy is schedulable
    [nomad] = [d for g in offered(snapshot, PluginConfig()).groups for d in g.devices]
    assert nomad.healthy is schedulable
    assert schedulable or f"XID {xid} (" in nomad.health_description
    known = Known()
    known.snapshot(Mirror({"generation": 1, "snapshot": snapshot}))
    exposition = render(known).decode()
    assert f'hotplug_monitor_device_health{{device="{H100.address}",state="{health}"}} 1.0' in (
        exposition
    )

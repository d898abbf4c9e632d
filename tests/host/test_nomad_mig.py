"""MIG instances through ``hotplug-monitor nomad-plugin`` as Nomad runs it (go-plugin's real
client, tests/nomad/host), against a daemon on one simulated H100 in MIG mode with the NVML
stand-in's example layout (``monitor.sim.mig``: two 1g.10gb instances and one 3g.40gb): one
device group a profile, Reserve by MIG UUID, every instance unhealthy when the GPU breaks, and
a repartition as the next Fingerprint message."""

from __future__ import annotations

import pytest

from monitor.sim.mig import (
    EXAMPLE_GPU_UUID,
    EXAMPLE_UUIDS,
    h100_mig,
)
from monitor.sim.nvml import FakeNvml
from monitor.sim.umockdev import Simulator
from monitor.wire import requests
from tests.conftest import Daemon
from tests.host.test_nomad_plugin import H100, Nomad, devices, groups, nomad  # noqa: F401

pytestmark = pytest.mark.umockdev

A = "0000:3b:00.0"
ONE, TWO, THREE = EXAMPLE_UUIDS  # 1g.10gb, 1g.10gb, 3g.40gb
SMALL, LARGE = f"nvidia/mig/{H100} MIG 1g.10gb", f"nvidia/mig/{H100} MIG 3g.40gb"


def test_each_profile_is_a_device_group_nomad_takes_and_reserve_takes_mig_uuids(
    nomad: Nomad,  # noqa: F811
    mig_daemon: Daemon,
    sim: Simulator,
) -> None:
    assert "error" not in nomad.launch("--socket", str(mig_daemon.socket))
    first = nomad.until(lambda d: set(EXAMPLE_UUIDS) <= set(d))  # nomad_refuses checked: []
    found = groups(first)
    assert set(found) == {SMALL, LARGE}  # the split GPU is no group of its own
    small = found[SMALL]
    assert sorted(d["ID"] for d in small["devices"]) == [ONE, TWO]
    assert all(d["hw_locality"]["pci_bus_id"] == A for d in small["devices"])
    attributes = small["attributes"]
    assert attributes["mig_profile"]["string_val"] == "1g.10gb"
    assert attributes["memory"]["unit"] == "MiB" and int(attributes["memory"]["int_val"]) > 0
    assert attributes["parent_uuid"]["string_val"] == EXAMPLE_GPU_UUID
    # Reserve by MIG UUID: the task sees that instance alone.
    got = nomad.reserve(ONE)
    assert "error" not in got, got
    assert got["message"]["container_res"]["envs"] == {"NVIDIA_VISIBLE_DEVICES": ONE}
    with mig_daemon.client() as client:
        leases = client.ask(requests.leases())["leases"]
    assert [(sorted(lease["devices"]), lease["owner"]) for lease in leases] == [([ONE], "nomad")]
    # The GPU breaks: every instance of it is unhealthy for Nomad.
    sim.pci_error(A, "BEGIN_RECOVERY")
    broken = devices(nomad.until(lambda d: not any(d[i]["healthy"] for i in EXAMPLE_UUIDS)))
    assert all("PCI error" in broken[i]["health_description"] for i in EXAMPLE_UUIDS)


def test_a_repartition_is_the_next_fingerprint(
    nomad: Nomad,  # noqa: F811
    mig_daemon: Daemon,
    mig_nvml: FakeNvml,
) -> None:
    assert "error" not in nomad.launch("--socket", str(mig_daemon.socket))
    nomad.until(lambda d: set(EXAMPLE_UUIDS) <= set(d))
    mig_nvml.set_mig(A, [h100_mig("2g.20gb", 0, 3, THREE)])
    after = nomad.until(lambda d: set(d) == {THREE})
    assert set(groups(after)) == {f"nvidia/mig/{H100} MIG 2g.20gb"}

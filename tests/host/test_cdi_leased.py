"""``--cdi-publish leased``: the CDI spec names leases only, each as one device named after its
reservation ID, on simulated NVIDIA, AMD and Intel GPUs (umockdev); and a real podman 4.3 that
gets a lease's devices by its name, and nothing once it is released or by any other name."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from monitor.sim.umockdev import Simulator
from tests.conftest import Daemon, need
from tests.container import (
    char_devices,
    fake_dev_missing,
    podman_missing,
    run_with_cdi,
    validate_cdi_spec,
)
from tests.host.test_cdi import NODELESS, add_nodeless, node_numbers, read_spec
from tests.waiting import wait_until

pytestmark = pytest.mark.umockdev

LEASE_KIND = "hotplug-monitor.io/lease"
NVIDIA, AMD, INTEL = "0000:3b:00.0", "0000:5b:00.0", "0000:9a:00.0"
DRM = {NVIDIA: ("card0", "renderD128"), INTEL: ("card2", "renderD130")}  # the leased GPUs' nodes


@pytest.fixture
def gpus(sim: Simulator) -> Simulator:
    sim.add("nvidia-h100", NVIDIA, 0)
    sim.add("amd-mi300x", AMD, 1)
    sim.add("intel-arc", INTEL, 0)
    return sim


def leased_daemon(start_daemon: Callable[..., Daemon], sim: Simulator, cdi_dir: Path) -> Daemon:
    return start_daemon(
        "--udev-source", "udev", "--cdi-dir", str(cdi_dir), "--cdi-publish", "leased",
        env=sim.daemon_env(),
    )  # fmt: skip


def entries(path: Path) -> dict[str, dict[str, Any]]:
    """The spec's devices by name, once read (the answers waited for it), checked valid."""
    spec: dict[str, Any] = json.loads(path.read_text())
    validate_cdi_spec(spec)
    assert spec["kind"] == LEASE_KIND
    return {device["name"]: device["containerEdits"] for device in spec["devices"]}


def nodes_of(answer: dict[str, Any]) -> list[str]:
    return [d["host_path"] for d in answer["devices"]]


def test_the_spec_names_each_lease_until_it_ends_and_nothing_else(
    gpus: Simulator, start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    add_nodeless(gpus)
    path = tmp_path / "cdi" / "hotplug-monitor.json"
    daemon = leased_daemon(start_daemon, gpus, tmp_path / "cdi")
    spec = read_spec(path, lambda s: s["kind"] == LEASE_KIND)
    validate_cdi_spec(spec)
    assert spec["devices"] == []  # present devices, none leased: none named
    with daemon.client() as client:
        both = client.call("reserve", {"device_ids": [NVIDIA, AMD]})
        lease = both["reservation_id"]
        assert both["cdi_devices"] == [f"{LEASE_KIND}={lease}"]
        published = entries(path)
        assert list(published) == [lease]  # one device for the lease, with both GPUs' edits
        nodes = [n["hostPath"] for n in published[lease]["deviceNodes"]]
        assert sorted(nodes) == sorted(nodes_of(both))
        assert {"/dev/nvidia0", "/dev/kfd"} <= set(nodes)
        assert client.call("release", {"reservation_id": lease})["released"] == [NVIDIA, AMD]
        assert entries(path) == {}  # gone before release answered
        # a device with nothing to inject: no CDI device for its lease (podman would refuse the
        # whole spec for an empty entry), so the answer names none
        nodeless = client.call("reserve", {"device_ids": [INTEL, NODELESS]})
        assert nodeless["cdi_devices"] == [] and entries(path) == {}
        client.call("release", {"reservation_id": nodeless["reservation_id"]})
    refused = daemon.cli("reserve", "--cdi", NODELESS)
    assert refused.returncode == 1 and refused.stdout == ""
    assert "nothing a container engine could be given" in refused.stderr

    # ended with its holder process, and with its connection
    holder = subprocess.Popen(["sleep", "60"])
    try:
        with daemon.client() as client:
            held = client.call("reserve", {"device_ids": [INTEL], "holder_pid": holder.pid})
        assert list(entries(path)) == [held["reservation_id"]]
    finally:
        holder.kill()
        holder.wait()
    wait_until(lambda: entries(path) == {}, what="the holder's lease to leave the spec")
    with daemon.client() as client:
        bound = client.call("reserve", {"device_ids": [INTEL], "bind": "connection"})
        assert list(entries(path)) == [bound["reservation_id"]]
    wait_until(lambda: entries(path) == {}, what="the connection's lease to leave the spec")

    # revoked: the device leaves the host; the lease stays (its holder learns why), its entry goes
    kept = json.loads(daemon.cli("reserve", "--json", AMD, INTEL).stdout)["reservation_id"]
    assert list(entries(path)) == [kept]
    gpus.remove(AMD)
    wait_until(lambda: entries(path) == {}, what="the revoked lease to leave the spec")
    assert [e["reservation_id"] for e in daemon.client().call("leases")["leases"]] == [kept]
    assert daemon.stop() == 0
    assert not path.exists()


def test_podman_gets_a_lease_by_its_name_and_nothing_after_it_ends(
    gpus: Simulator, start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """The real podman 4.3 reads the spec: the nodes of the simulated host are made in its
    private mount namespace only (tests/container.py)."""
    need(podman_missing())
    need(fake_dev_missing())
    cdi_dir = tmp_path / "cdi"
    daemon = leased_daemon(start_daemon, gpus, cdi_dir)
    read_spec(cdi_dir / "hotplug-monitor.json", lambda s: s["kind"] == LEASE_KIND)
    cdi = daemon.cli("reserve", "--cdi", NVIDIA, INTEL)
    assert cdi.returncode == 0, cdi.stderr
    lease = daemon.client().call("leases")["leases"][0]["reservation_id"]
    assert cdi.stdout == f"--device={LEASE_KIND}={lease}\n"
    edits = entries(cdi_dir / "hotplug-monitor.json")[lease]
    paths = sorted(n["path"] for n in edits["deviceNodes"])
    assert {f"/dev/dri/{node}" for pair in DRM.values() for node in pair} <= set(paths)
    links = {  # the by-path links the mounts bind, to the node of their own GPU
        m["hostPath"]: f"../{DRM[address][m['hostPath'].endswith('-render')]}"
        for m in edits["mounts"]
        for address in DRM
        if f"pci-{address}-" in m["hostPath"]
    }
    assert len(links) == len(edits["mounts"]) == 4
    every_node = [*paths, "/dev/kfd", "/dev/dri/card1", "/dev/dri/renderD129"]  # AMD's: not leased
    fake = {path: node_numbers(path) for path in every_node}
    listing = ["sh", "-c", f"ls -ln {' '.join(paths)}; ls -ln /dev /dev/dri"]

    def run(kind: str, name: str) -> subprocess.CompletedProcess[str]:
        return run_with_cdi(cdi_dir, [name], listing, fake_nodes=fake, fake_links=links, kind=kind)

    given = run(LEASE_KIND, lease)
    assert given.returncode == 0, given.stderr
    seen = char_devices(given.stdout)
    assert "/dev/nvidia0" in paths and any("/dri/card" in p for p in paths)  # both GPUs'
    assert {p: seen[p] for p in paths} == {p: node_numbers(p) for p in paths}
    assert "kfd" not in seen and "card1" not in seen  # the AMD GPU nobody leased
    for kind, name in [(LEASE_KIND, AMD), ("hotplug-monitor.io/gpu", AMD), (LEASE_KIND, "x")]:
        other = run(kind, name)  # a device not leased is not reachable through the spec
        assert other.returncode != 0 and "unresolvable CDI devices" in other.stderr, other.stderr
    released = daemon.cli("release", "--reservation", lease)
    assert released.returncode == 0, released.stderr
    again = run(LEASE_KIND, lease)  # the same command, right after release answered
    assert again.returncode != 0
    assert "unresolvable CDI devices" in again.stderr, again.stderr

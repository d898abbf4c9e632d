"""MIG end to end: the daemon on a simulated H100 (umockdev) in MIG mode, with the real
nvidia-ml-py bindings loading the stand-in libnvidia-ml.so.1, repartitioned while it runs.

``start_mig_daemon`` and ``mig_daemon`` (tests/conftest.py) are how a host test starts a daemon
with an H100 in MIG mode (two 1g.10gb and one 3g.40gb instance,
``monitor.sim.mig.example_layout``)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from monitor.sim.mig import (
    EXAMPLE_GPU_UUID,
    EXAMPLE_UUIDS,
    ci_access_minor,
    example_layout,
    gi_access_minor,
    h100_mig,
)
from monitor.sim.nvml import FakeGpu, FakeNvml
from monitor.sim.umockdev import Simulator
from monitor.wire.errors import RpcError
from monitor.wire.mirror import Mirror
from tests.conftest import Daemon, Subscription, need
from tests.container import (
    char_devices,
    fake_dev_missing,
    podman_missing,
    run_with_cdi,
    validate_cdi_spec,
)
from tests.waiting import wait_until

pytestmark = pytest.mark.umockdev

A = "0000:3b:00.0"
ONE_A, ONE_B, THREE = EXAMPLE_UUIDS
NAME = "NVIDIA H100 80GB HBM3"
SMALL = f"nvidia/mig/{NAME} MIG 1g.10gb"
LARGE = f"nvidia/mig/{NAME} MIG 3g.40gb"


def ids(mirror: Mirror) -> set[str]:
    return set(mirror.devices())


def device(mirror: Mirror, device_id: str) -> dict[str, Any]:
    found = mirror.devices().get(device_id)
    return found[1] if found else {}


def test_mig_instances_are_devices_and_a_repartition_shows_at_once(
    start_mig_daemon: Callable[..., Daemon],
    mig_nvml: FakeNvml,
    subscribe: Callable[[Daemon], Subscription],
) -> None:
    daemon = start_mig_daemon("--health-interval", "0")  # only NVML's event says it changed
    sub = subscribe(daemon)
    mirror = sub.until(lambda m: ids(m) == {ONE_A, ONE_B, THREE})
    groups = mirror.snapshot["groups"]
    assert set(groups[SMALL]["devices"]) == {ONE_A, ONE_B}
    assert set(groups[LARGE]["devices"]) == {THREE}
    assert (groups[SMALL]["vendor"], groups[SMALL]["type"]) == ("nvidia", "mig")
    small = device(mirror, ONE_A)
    values = {k: a["value"] for k, a in small["attributes"].items()}
    assert values["mig_profile"] == "1g.10gb" and values["memory"] == 9984
    assert small["attributes"]["memory"]["unit"] == "MiB"
    assert values["gpu_instance_id"] == 9 and values["compute_instance_id"] == 0
    assert values["gpu_slices"] == 1 and values["compute_slices"] == 1
    assert values["parent_uuid"] == EXAMPLE_GPU_UUID and values["parent_pci_bus_id"] == A
    assert values["numa_node"] == 0
    assert small["hw_locality"] == {"pci_bus_id": A}
    # leased one by one; the GPU is not leased whole while it has instances
    with daemon.client() as client:
        granted = client.call("reserve", {"device_ids": [ONE_A]})
        assert granted["envs"] == {"NVIDIA_VISIBLE_DEVICES": ONE_A}
        with pytest.raises(RpcError) as refused:
            client.call("reserve", {"device_ids": [A]})
        assert refused.value.code == -32001
        assert "reserve one of its MIG instances" in refused.value.message
        assert ONE_A in refused.value.message
    # repartitioned while it runs: ONE_A (held) and ONE_B destroyed, a 4g.40gb created
    four = "MIG-44444444-4444-4444-8444-444444444444"
    mig_nvml.set_mig(A, [example_layout()[0], h100_mig("4g.40gb", 1, 1, four)])
    mirror = sub.until(lambda m: ids(m) == {THREE, four})
    assert four in mirror.snapshot["groups"][f"nvidia/mig/{NAME} MIG 4g.40gb"]["devices"]
    with daemon.client() as client:
        assert client.call("leases")["leases"] == []  # its lease ended with it
    assert "its MIG instance was destroyed" in daemon.log()


def test_an_application_xid_in_an_instance_is_counted_there_alone(
    start_mig_daemon: Callable[..., Daemon],
    mig_nvml: FakeNvml,
    subscribe: Callable[[Daemon], Subscription],
) -> None:
    daemon = start_mig_daemon()
    sub = subscribe(daemon)
    sub.until(lambda m: ids(m) == {ONE_A, ONE_B, THREE})
    mig_nvml.xid(A, 13, gpu_instance=9, compute_instance=0)
    mirror = sub.until(lambda m: "last_xid" in device(m, ONE_A).get("attributes", {}))
    assert "last_xid" not in device(mirror, ONE_B)["attributes"]
    assert "XID 13 in GPU instance 9, compute instance 0" in daemon.log()
    assert all(device(mirror, i)["healthy"] for i in (ONE_A, ONE_B, THREE))
    mig_nvml.xid(A, 48, gpu_instance=9, compute_instance=0)  # needs a reset: the whole GPU's
    mirror = sub.until(lambda m: not device(m, THREE).get("healthy", True))
    assert not device(mirror, ONE_A)["healthy"] and not device(mirror, ONE_B)["healthy"]


def test_mig_mode_turned_off_shows_the_gpu_whole_on_the_next_sweep(
    start_mig_daemon: Callable[..., Daemon],
    mig_nvml: FakeNvml,
    subscribe: Callable[[Daemon], Subscription],
) -> None:
    sub = subscribe(start_mig_daemon("--health-interval", "1"))
    sub.until(lambda m: ids(m) == {ONE_A, ONE_B, THREE})
    mig_nvml.set_gpus([FakeGpu(bus_id=A, uuid=EXAMPLE_GPU_UUID, minor=0, mig_mode=0)])
    mig_nvml.set_mig(A, [], announce=False)  # no event: the sweep finds it
    mirror = sub.until(lambda m: ids(m) == {A})
    assert device(mirror, A)["attributes"]["mig_mode"]["value"] == "disabled"


def test_sighup_reads_the_layouts_again_where_nvml_said_nothing(
    start_mig_daemon: Callable[..., Daemon],
    mig_nvml: FakeNvml,
    subscribe: Callable[[Daemon], Subscription],
) -> None:
    daemon = start_mig_daemon("--health-interval", "0")
    sub = subscribe(daemon)
    sub.until(lambda m: ids(m) == {ONE_A, ONE_B, THREE})
    mig_nvml.set_mig(A, example_layout()[:1], announce=False)  # no event, no sweep
    daemon.process.send_signal(signal.SIGHUP)
    sub.until(lambda m: ids(m) == {THREE})


def test_without_the_mig_minors_file_an_instance_is_refused_saying_why(
    tmp_path: Path,
    sim: Simulator,
    mig_nvml: FakeNvml,
    start_daemon: Callable[..., Daemon],
    subscribe: Callable[[Daemon], Subscription],
) -> None:
    sim.add("nvidia-h100", A, 0)
    missing = tmp_path / "no-such-mig-minors"
    env = {**sim.daemon_env(), **mig_nvml.env()}
    daemon = start_daemon("--udev-source", "udev", "--mig-minors", str(missing), env=env, nvml=True)
    sub = subscribe(daemon)
    sub.until(lambda m: ids(m) == {ONE_A, ONE_B, THREE})
    with daemon.client() as client, pytest.raises(RpcError) as refused:
        client.call("reserve", {"device_ids": [ONE_A]})
    assert refused.value.code == -32602
    assert str(missing) in refused.value.message and "capability nodes" in refused.value.message
    assert "MIG instances get no capability nodes" in daemon.log()


def test_without_mig_instances_a_missing_mig_minors_file_is_not_read_nor_warned_of(
    tmp_path: Path,
    sim: Simulator,
    nvml_lib: Path,
    start_daemon: Callable[..., Daemon],
    subscribe: Callable[[Daemon], Subscription],
) -> None:
    """Hosts without MIG (most, and the demo) have no mig-minors file: nothing to say of it."""
    sim.add("nvidia-h100", A, 0)
    nvml = FakeNvml(tmp_path / "nvml", nvml_lib, [FakeGpu(bus_id=A, uuid=EXAMPLE_GPU_UUID)])
    missing = tmp_path / "no-such-mig-minors"
    env = {**sim.daemon_env(), **nvml.env()}
    daemon = start_daemon("--udev-source", "udev", "--mig-minors", str(missing), env=env, nvml=True)
    # NVML's facts (the UUID) come after the GPU's MIG layout (off): it has been handled by then.
    uuid = EXAMPLE_GPU_UUID
    subscribe(daemon).until(
        lambda m: device(m, A).get("attributes", {}).get("uuid", {}).get("value") == uuid
    )
    assert "mig-minors" not in daemon.log() and "capability nodes" not in daemon.log()


def test_a_gpu_with_mig_devices_is_never_shown_whole_at_start(
    start_mig_daemon: Callable[..., Daemon], subscribe: Callable[[Daemon], Subscription]
) -> None:
    daemon = start_mig_daemon()
    sub = subscribe(daemon)
    seen = [set(sub.mirror.devices())]
    while seen[-1] != {ONE_A, ONE_B, THREE}:
        sub.next()
        seen.append(set(sub.mirror.devices()))
    assert not any(A in ids for ids in seen), seen


def test_an_instance_lease_gets_its_capability_nodes_from_the_drivers_files(
    sim: Simulator,
    mig_nvml: FakeNvml,
    start_daemon: Callable[..., Daemon],
    subscribe: Callable[[Daemon], Subscription],
) -> None:
    """The default --mig-minors, and the nodes, as the driver would make them (umockdev)."""
    sim.add("nvidia-h100", A, 0)
    sim.mig_nodes(0)
    daemon = start_daemon(
        "--udev-source", "udev", env={**sim.daemon_env(), **mig_nvml.env()}, nvml=True
    )
    subscribe(daemon).until(lambda m: ids(m) == {ONE_A, ONE_B, THREE})
    with daemon.client() as client:
        granted = client.call("reserve", {"device_ids": [THREE]})
    nodes = [d["host_path"] for d in granted["devices"]]
    gi, ci = gi_access_minor(0, 2), ci_access_minor(0, 2, 0)  # THREE: GPU instance 2
    assert nodes == [
        "/dev/nvidia0",
        "/dev/nvidiactl",
        "/dev/nvidia-uvm",
        "/dev/nvidia-uvm-tools",
        f"/dev/nvidia-caps/nvidia-cap{gi}",
        f"/dev/nvidia-caps/nvidia-cap{ci}",
    ]
    assert granted["envs"] == {"NVIDIA_VISIBLE_DEVICES": THREE}


def test_a_real_container_given_an_instance_gets_its_gpu_and_capability_nodes(
    tmp_path: Path,
    sim: Simulator,
    mig_nvml: FakeNvml,
    start_daemon: Callable[..., Daemon],
) -> None:
    """podman reads the daemon's CDI spec (``all``) and asks for an instance by its MIG UUID;
    the simulated host's nodes are made in podman's private mount namespace only."""
    need(podman_missing())
    need(fake_dev_missing())
    sim.add("nvidia-h100", A, 0)
    sim.mig_nodes(0)
    cdi_dir = tmp_path / "cdi"
    env = {**sim.daemon_env(), **mig_nvml.env()}
    start_daemon("--udev-source", "udev", "--cdi-dir", str(cdi_dir), env=env, nvml=True)
    path = cdi_dir / "hotplug-monitor.json"

    def three() -> dict[str, Any] | None:
        spec: dict[str, Any] = json.loads(path.read_text())
        return spec if len(spec["devices"]) == 3 else None

    spec = wait_until(
        three, what="the spec to name the three instances", ignoring=(FileNotFoundError,)
    )
    validate_cdi_spec(spec)
    edits = {d["name"]: d["containerEdits"] for d in spec["devices"]}
    assert set(edits) == {ONE_A, ONE_B, THREE}
    wanted = [n["path"] for n in edits[ONE_B]["deviceNodes"]]
    gi, ci = gi_access_minor(0, 10), ci_access_minor(0, 10, 0)  # ONE_B: GPU instance 10
    assert f"/dev/nvidia-caps/nvidia-cap{gi}" in wanted
    numbers = {p: (195 if "caps" not in p else 235, k) for k, p in enumerate(wanted)}
    result = run_with_cdi(
        cdi_dir, [ONE_B], ["sh", "-c", f"ls -ln {' '.join(wanted)}"], fake_nodes=numbers
    )
    assert result.returncode == 0, result.stderr
    seen = char_devices(result.stdout)
    assert seen == numbers  # each node the spec names, as the host has it
    caps = f"/dev/nvidia-caps/nvidia-cap{gi}", f"/dev/nvidia-caps/nvidia-cap{ci}"
    assert {*caps, "/dev/nvidia0", "/dev/nvidiactl"} <= set(seen)


def test_mig_devices_shared_by_a_config_rule_are_leased_as_replicas(
    tmp_path: Path,
    start_mig_daemon: Callable[..., Daemon],
    subscribe: Callable[[Daemon], Subscription],
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[[share]]\nmatch = "nvidia/mig/{NAME} MIG 1g.10gb"\nreplicas = 2\n')
    daemon = start_mig_daemon("--config", str(config))
    replicas = {f"{ONE_A}::0", f"{ONE_A}::1", f"{ONE_B}::0", f"{ONE_B}::1"}
    mirror = subscribe(daemon).until(lambda m: ids(m) == {*replicas, THREE})
    shared = mirror.snapshot["groups"][f"nvidia/mig.shared/{NAME} MIG 1g.10gb"]
    assert set(shared["devices"]) == replicas
    with daemon.client() as client:
        granted = client.call("reserve", {"device_ids": [f"{ONE_B}::1"]})
        assert granted["envs"] == {"NVIDIA_VISIBLE_DEVICES": ONE_B}
        with pytest.raises(RpcError) as refused:
            client.call("reserve", {"device_ids": [ONE_B]})
        assert refused.value.code == -32001 and "shared as 2 replicas" in refused.value.message


def test_the_drivers_xid_line_naming_an_instance_counts_there_alone(
    tmp_path: Path,
    start_mig_daemon: Callable[..., Daemon],
    subscribe: Callable[[Daemon], Subscription],
) -> None:
    fifo = tmp_path / "kmsg"
    os.mkfifo(fifo)
    sub = subscribe(start_mig_daemon("--kmsg", str(fifo)))
    sub.until(lambda m: ids(m) == {ONE_A, ONE_B, THREE})
    text = "NVRM: Xid (PCI:0000:3b:00 GPU-I:10 GPU-CI:00): 13, pid=42, name=trainer, test line"
    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, f"4,1,1000,-;{text}\n".encode())
    finally:
        os.close(fd)
    mirror = sub.until(lambda m: "last_xid" in device(m, ONE_B).get("attributes", {}))
    assert device(mirror, ONE_B)["attributes"]["last_xid_source"]["value"] == "kmsg"
    assert "last_xid" not in device(mirror, ONE_A)["attributes"]

"""MIG end to end: the daemon on a simulated H100 (umockdev) in MIG mode, with the real
nvidia-ml-py bindings loading the stand-in libnvidia-ml.so.1, repartitioned while it runs.

``mig_daemon`` is how a host test starts a daemon with an H100 in MIG mode (two 1g.10gb and one
3g.40gb instance, ``monitor.sim.mig.example_layout``)."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from monitor.sim.mig import (
    EXAMPLE_GPU_UUID,
    EXAMPLE_UUIDS,
    example_layout,
    h100_mig,
    mig_h100_nvml,
    write_mig_minors,
)
from monitor.sim.nvml import FakeGpu, FakeNvml
from monitor.sim.umockdev import Simulator
from monitor.wire.errors import RpcError
from monitor.wire.mirror import Mirror
from tests.conftest import Daemon, Subscription

pytestmark = pytest.mark.umockdev

A = "0000:3b:00.0"
ONE_A, ONE_B, THREE = EXAMPLE_UUIDS
NAME = "NVIDIA H100 80GB HBM3"
SMALL = f"nvidia/mig/{NAME} MIG 1g.10gb"
LARGE = f"nvidia/mig/{NAME} MIG 3g.40gb"


@pytest.fixture
def nvml(tmp_path: Path, nvml_lib: Path) -> FakeNvml:
    return mig_h100_nvml(tmp_path, nvml_lib, A)


@pytest.fixture
def mig_daemon(
    tmp_path: Path, sim: Simulator, nvml: FakeNvml, start_daemon: Callable[..., Daemon]
) -> Callable[..., Daemon]:
    """Start the daemon on one H100 in MIG mode (at ``A``), with a mig-minors file of its own."""
    sim.add("nvidia-h100", A, 0)
    minors = write_mig_minors(tmp_path / "mig-minors")

    def start(*args: str) -> Daemon:
        env = {**sim.daemon_env(), **nvml.env()}
        return start_daemon(
            "--udev-source", "udev", "--mig-minors", str(minors), *args, env=env, nvml=True
        )

    return start


def ids(mirror: Mirror) -> set[str]:
    return set(mirror.devices())


def device(mirror: Mirror, device_id: str) -> dict[str, Any]:
    found = mirror.devices().get(device_id)
    return found[1] if found else {}


def test_mig_instances_are_devices_and_a_repartition_shows_at_once(
    mig_daemon: Callable[..., Daemon],
    nvml: FakeNvml,
    subscribe: Callable[[Daemon], Subscription],
) -> None:
    daemon = mig_daemon("--health-interval", "0")  # only NVML's event says it changed
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
    nvml.set_mig(A, [example_layout()[0], h100_mig("4g.40gb", 1, 1, four)])
    mirror = sub.until(lambda m: ids(m) == {THREE, four})
    assert four in mirror.snapshot["groups"][f"nvidia/mig/{NAME} MIG 4g.40gb"]["devices"]
    with daemon.client() as client:
        assert client.call("leases")["leases"] == []  # its lease ended with it
    assert "its MIG instance was destroyed" in daemon.log()


def test_an_application_xid_in_an_instance_is_counted_there_alone(
    mig_daemon: Callable[..., Daemon],
    nvml: FakeNvml,
    subscribe: Callable[[Daemon], Subscription],
) -> None:
    sub = subscribe(mig_daemon())
    sub.until(lambda m: ids(m) == {ONE_A, ONE_B, THREE})
    nvml.xid(A, 13, gpu_instance=9, compute_instance=0)
    mirror = sub.until(lambda m: "last_xid" in device(m, ONE_A).get("attributes", {}))
    assert "last_xid" not in device(mirror, ONE_B)["attributes"]
    assert all(device(mirror, i)["healthy"] for i in (ONE_A, ONE_B, THREE))
    nvml.xid(A, 48, gpu_instance=9, compute_instance=0)  # needs a reset: the whole GPU's
    mirror = sub.until(lambda m: not device(m, THREE).get("healthy", True))
    assert not device(mirror, ONE_A)["healthy"] and not device(mirror, ONE_B)["healthy"]


def test_mig_mode_turned_off_shows_the_gpu_whole_on_the_next_sweep(
    mig_daemon: Callable[..., Daemon],
    nvml: FakeNvml,
    subscribe: Callable[[Daemon], Subscription],
) -> None:
    sub = subscribe(mig_daemon("--health-interval", "1"))
    sub.until(lambda m: ids(m) == {ONE_A, ONE_B, THREE})
    nvml.set_gpus([FakeGpu(bus_id=A, uuid=EXAMPLE_GPU_UUID, minor=0, mig_mode=0)])
    nvml.set_mig(A, [], announce=False)  # no event: the sweep finds it
    mirror = sub.until(lambda m: ids(m) == {A})
    assert device(mirror, A)["attributes"]["mig_mode"]["value"] == "disabled"


def test_sighup_reads_the_layouts_again_where_nvml_said_nothing(
    mig_daemon: Callable[..., Daemon],
    nvml: FakeNvml,
    subscribe: Callable[[Daemon], Subscription],
) -> None:
    daemon = mig_daemon("--health-interval", "0")
    sub = subscribe(daemon)
    sub.until(lambda m: ids(m) == {ONE_A, ONE_B, THREE})
    nvml.set_mig(A, example_layout()[:1], announce=False)  # no event, no sweep
    daemon.process.send_signal(signal.SIGHUP)
    sub.until(lambda m: ids(m) == {THREE})


def test_without_the_mig_minors_file_an_instance_is_refused_saying_why(
    tmp_path: Path,
    sim: Simulator,
    nvml: FakeNvml,
    start_daemon: Callable[..., Daemon],
    subscribe: Callable[[Daemon], Subscription],
) -> None:
    sim.add("nvidia-h100", A, 0)
    missing = tmp_path / "no-such-mig-minors"
    env = {**sim.daemon_env(), **nvml.env()}
    daemon = start_daemon("--udev-source", "udev", "--mig-minors", str(missing), env=env, nvml=True)
    sub = subscribe(daemon)
    sub.until(lambda m: ids(m) == {ONE_A, ONE_B, THREE})
    with daemon.client() as client, pytest.raises(RpcError) as refused:
        client.call("reserve", {"device_ids": [ONE_A]})
    assert refused.value.code == -32602
    assert str(missing) in refused.value.message and "capability nodes" in refused.value.message
    assert "MIG instances get no capability nodes" in daemon.log()

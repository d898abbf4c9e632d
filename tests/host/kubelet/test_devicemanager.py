"""Level 1: ``hotplug-monitor kubelet-plugin`` against the kubelet's own device manager.

The device manager is the kubelet's code (Debian's ``kubernetes`` source, 1.20.2), built into
its package's test binary together with our driver (devicemanager_test.go): registration,
ListAndWatch, GetPreferredAllocation and Allocate go through its real gRPC client, capacity and
allocatable are what it would put in the node's status, and the PodResources answers the plugin
reconciles with come from the kubelet's real PodResources servers. The daemon runs on simulated
GPUs (umockdev) with the NVML stand-in.

Measured figures go to build/kubelet-plugin.json (and are printed with ``-s``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from monitor.adapters.kubelet.options import Options
from monitor.adapters.kubelet.protos import deviceplugin_pb2 as api
from monitor.adapters.kubelet.protos import deviceplugin_pb2_grpc as api_grpc
from monitor.sim.nvml import FakeGpu, FakeNvml
from monitor.sim.umockdev import Simulator
from monitor.wire import requests
from monitor.wire.errors import DEVICE_RESERVED, RpcError
from tests.conftest import Daemon, Subscription
from tests.host.kubelet.generate import main as generate_main
from tests.host.kubelet.harness import (
    RESOURCE,
    DeviceManager,
    PluginProcess,
    build,
)
from tests.reliability import record
from tests.waiting import wait_until

pytestmark = [pytest.mark.umockdev, pytest.mark.kubelet]

REPO = Path(__file__).resolve().parents[3]
A, B, C = "0000:3b:00.0", "0000:86:00.0", "0000:87:00.0"
NUMA = {A: 0, B: 1, C: 1}
UUIDS = {
    A: "GPU-0a0a0a0a-1111-2222-3333-444444444444",
    B: "GPU-0b0b0b0b-5555-6666-7777-888888888888",
    C: "GPU-0c0c0c0c-9999-aaaa-bbbb-cccccccccccc",
}

measured: dict[str, Any] = {}


def keep(name: str, value: Any) -> None:
    measured[name] = value
    out = REPO / "build" / "kubelet-plugin.json"
    out.parent.mkdir(exist_ok=True)
    previous = json.loads(out.read_text()) if out.exists() else {}
    out.write_text(json.dumps({**previous, **measured}, indent=1) + "\n")
    print(f"{name}: {value}")


@pytest.fixture(scope="session")
def manager_binary() -> Path:
    return build("devicemanager")


@pytest.fixture
def nvml(tmp_path: Path, nvml_lib: Path) -> FakeNvml:
    gpus = [FakeGpu(bus_id=A, uuid=UUIDS[A], minor=0), FakeGpu(bus_id=B, uuid=UUIDS[B], minor=1)]
    return FakeNvml(tmp_path / "nvml", nvml_lib, gpus)


def named(sub: Subscription, *addresses: str) -> None:
    """Wait until NVML has named each of ``addresses``."""

    def done(mirror: Any) -> bool:
        found = mirror.devices()
        return all(
            a in found and found[a][1]["attributes"].get("uuid", {}).get("value") == UUIDS[a]
            for a in addresses
        )

    sub.until(done, timeout=20)


@pytest.fixture
def gpus(sim: Simulator) -> Simulator:
    sim.add("nvidia-h100", A, NUMA[A])
    sim.add("nvidia-h100", B, NUMA[B])
    return sim


@pytest.fixture
def daemon(
    gpus: Simulator,
    nvml: FakeNvml,
    start_daemon: Callable[..., Daemon],
    subscribe: Callable[[Daemon], Subscription],
) -> Daemon:
    started = start_daemon(
        "--udev-source", "udev", env={**gpus.daemon_env(), **nvml.env()}, nvml=True
    )
    named(subscribe(started), A, B)
    return started


@pytest.fixture
def dirs() -> Iterator[dict[str, Path]]:
    """Short paths (a socket's is at most 107 bytes), as the kubelet's own are."""
    top = Path(tempfile.mkdtemp(prefix="hm-kubelet-"))
    plugins = top / "device-plugins"
    plugins.mkdir()
    yield {"plugins": plugins, "pod_resources": top / "pod-resources.sock"}
    shutil.rmtree(top)


@pytest.fixture
def manager(manager_binary: Path, tmp_path: Path, dirs: dict[str, Path]) -> Iterator[DeviceManager]:
    driven = DeviceManager(manager_binary, tmp_path / "devicemanager.log")
    started = driven.request(
        "start", socket=str(dirs["plugins"] / "kubelet.sock"), numa_nodes=[0, 1]
    )
    assert started == {"ok": True}, (started, driven.log())
    yield driven
    driven.close()


@pytest.fixture
def start_plugin(
    tmp_path: Path, daemon: Daemon, dirs: dict[str, Path]
) -> Iterator[Callable[..., PluginProcess]]:
    started: list[PluginProcess] = []

    def start(*extra: str) -> PluginProcess:
        plugin = PluginProcess(
            [
                "--socket", str(daemon.socket),
                "--kubelet-dir", str(dirs["plugins"]),
                "--pod-resources-socket", str(dirs["pod_resources"]),
                "--reconcile-interval", "0.5",
                *extra,
            ],
            tmp_path / f"plugin-{len(started)}.log",
        )  # fmt: skip
        started.append(plugin)
        return plugin

    yield start
    for plugin in started:
        assert plugin.stop() == 0, plugin.log()
        assert not list(dirs["plugins"].glob("hotplug-monitor-*.sock"))  # it cleaned up


def kubelet_leases(daemon: Daemon) -> dict[str, str]:
    """Device -> reservation of the daemon's leases of owner kubelet."""
    with daemon.client() as client:
        leases = client.ask(requests.leases())["leases"]
    return {d: lease["reservation_id"] for lease in leases if lease["owner"] == "kubelet"
            for d in lease["devices"]}  # fmt: skip


def test_generated_code_matches_protos() -> None:
    assert generate_main(["--check"]) == 0


def test_the_device_manager_registers_the_plugin_and_follows_hotplug_and_health(
    manager: DeviceManager,
    start_plugin: Callable[..., PluginProcess],
    daemon: Daemon,
    gpus: Simulator,
    nvml: FakeNvml,
) -> None:
    plugin = start_plugin()
    ready = manager.wait(capacity=2, allocatable=2)
    keep("start_to_allocatable_ms", round((ready["received_unix_ns"] - plugin.started_ns) / 1e6))
    plugin.until_logged(f"registered {RESOURCE} with the kubelet")
    devices = manager.devices()
    assert set(devices) == {A, B}
    assert all(d["health"] == "Healthy" and d["numa"] == [NUMA[i]] for i, d in devices.items())
    # A hot-added GPU reaches allocatable once NVML has named it.
    nvml.set_gpus([FakeGpu(bus_id=x, uuid=UUIDS[x], minor=m) for m, x in enumerate((A, B, C))])
    began = time.time_ns()
    gpus.add("nvidia-h100", C, NUMA[C])
    added = manager.wait(capacity=3, allocatable=3)
    keep("hot_add_to_allocatable_ms", round((added["received_unix_ns"] - began) / 1e6, 1))
    assert manager.devices()[C]["numa"] == [1]
    # A PCI error takes the device out of allocatable (capacity stays), and back when mended.
    began = time.time_ns()
    gpus.pci_error(A, "BEGIN_RECOVERY")
    broken = manager.wait(capacity=3, allocatable=2)
    keep("pci_error_to_allocatable_ms", round((broken["received_unix_ns"] - began) / 1e6, 1))
    assert manager.devices()[A]["health"] == "Unhealthy"
    gpus.pci_error(A, "SUCCESSFUL_RECOVERY")
    manager.wait(capacity=3, allocatable=3)
    # A device reserved outside Kubernetes is Unhealthy for the kubelet until released.
    with daemon.client() as client:
        lease = client.ask(requests.reserve([B]))["reservation_id"]
    manager.wait(capacity=3, allocatable=2)
    assert manager.devices()[B]["health"] == "Unhealthy"
    with daemon.client() as client:
        client.ask(requests.release(reservation_id=lease))
    manager.wait(capacity=3, allocatable=3)
    # A removed GPU leaves capacity.
    gpus.remove(C)
    manager.wait(capacity=2, allocatable=2)


def test_allocate_prefers_one_numa_node_and_answers_with_the_daemons_edits(
    manager: DeviceManager,
    start_plugin: Callable[..., PluginProcess],
    daemon: Daemon,
    gpus: Simulator,
    nvml: FakeNvml,
) -> None:
    nvml.set_gpus([FakeGpu(bus_id=x, uuid=UUIDS[x], minor=m) for m, x in enumerate((A, B, C))])
    gpus.add("nvidia-h100", C, NUMA[C])
    start_plugin()
    manager.wait(capacity=3, allocatable=3)
    # Two devices: the manager asks GetPreferredAllocation; B and C share NUMA node 1.
    two = manager.request("allocate", pod="two", resource=RESOURCE, count=2)
    assert "error" not in two, (two, manager.log())
    assert two["device_ids"] == [B, C]
    # The kubelet passes the devices in no particular order; the env lists them as passed.
    assert set(two["envs"]) == {"NVIDIA_VISIBLE_DEVICES"}
    assert sorted(two["envs"]["NVIDIA_VISIBLE_DEVICES"].split(",")) == [UUIDS[B], UUIDS[C]]
    nodes = {d["host_path"]: d for d in two["devices"]}
    assert {"/dev/nvidia1", "/dev/nvidia2", "/dev/nvidiactl", "/dev/nvidia-uvm"} <= set(nodes)
    assert "/dev/nvidia0" not in nodes  # A's node is A's
    assert all(d["container_path"] == p and d["permissions"] == "rwm" for p, d in nodes.items())
    assert all(m["read_only"] for m in two["mounts"])
    leases = kubelet_leases(daemon)
    assert set(leases) == {B, C}
    keep("allocate_ms", two["allocate_ms"])
    # The last one: A. The kubelet keeps the devices allocated to "two" out of it.
    one = manager.request("allocate", pod="one", resource=RESOURCE, count=1)
    assert one["device_ids"] == [A] and one["envs"] == {"NVIDIA_VISIBLE_DEVICES": UUIDS[A]}
    assert set(kubelet_leases(daemon)) == {A, B, C}
    # Allocated devices stay Healthy for the kubelet: it decides among its own pods.
    assert manager.request("capacity")["allocatable"][RESOURCE] == 3
    # Another client cannot take a device the kubelet holds.
    with daemon.client() as client, pytest.raises(RpcError) as refused:
        client.ask(requests.reserve([A]))
    assert refused.value.code == DEVICE_RESERVED


def test_leases_of_pods_that_are_gone_end_by_reconcile(
    manager: DeviceManager,
    start_plugin: Callable[..., PluginProcess],
    daemon: Daemon,
    dirs: dict[str, Path],
) -> None:
    # kubelet 1.20 serves PodResources v1alpha1 and v1; the plugin takes v1 when it is there.
    served = manager.request("serve_pod_resources", socket=str(dirs["pod_resources"]))
    assert served == {"ok": True}
    plugin = start_plugin()
    manager.wait(capacity=2, allocatable=2)
    first = manager.request("allocate", pod="first", resource=RESOURCE, count=1)
    second = manager.request("allocate", pod="second", resource=RESOURCE, count=1)
    held = {first["device_ids"][0]: "first", second["device_ids"][0]: "second"}
    assert set(kubelet_leases(daemon)) == {A, B}
    # Several reconciles pass (0.5 s apart): pods that still run keep their leases.
    time.sleep(3)
    assert set(kubelet_leases(daemon)) == {A, B}
    began = time.monotonic()
    manager.request("remove_pod", pod="first")
    gone = next(d for d, pod in held.items() if pod == "first")
    wait_until(lambda: set(kubelet_leases(daemon)) == {A, B} - {gone}, 20, "first's lease ended")
    keep("pod_gone_to_lease_ended_s", round(time.monotonic() - began, 2))
    plugin.until_logged(f"reconciled with the kubelet: released {gone}")


def test_reconcile_reads_v1alpha1_from_a_kubelet_without_v1(
    manager: DeviceManager,
    start_plugin: Callable[..., PluginProcess],
    daemon: Daemon,
    dirs: dict[str, Path],
) -> None:
    served = manager.request(
        "serve_pod_resources", socket=str(dirs["pod_resources"]), versions=["v1alpha1"]
    )
    assert served == {"ok": True}
    start_plugin()
    manager.wait(capacity=2, allocatable=2)
    only = manager.request("allocate", pod="only", resource=RESOURCE, count=1)
    time.sleep(3)
    assert set(kubelet_leases(daemon)) == set(only["device_ids"])
    manager.request("remove_pod", pod="only")
    wait_until(lambda: not kubelet_leases(daemon), 20, "the lease ended")


def test_a_restarted_device_manager_gets_the_plugin_back_each_time(
    manager: DeviceManager, start_plugin: Callable[..., PluginProcess]
) -> None:
    plugin = start_plugin()
    manager.wait(capacity=2, allocatable=2)
    gaps = []
    for attempt in range(3):
        restarted = manager.request("restart")
        assert restarted["ok"], restarted
        back = manager.wait(capacity=2, allocatable=2, timeout=30)
        gaps.append(round((back["received_unix_ns"] - restarted["restarted_unix_ns"]) / 1e6))
        plugin.until_logged(f"registered {RESOURCE} with the kubelet", count=attempt + 2)
    assert plugin.process.poll() is None  # it never exited
    # How fast (the issue asks for a second) is the benchmark's: scenario 12.
    keep("manager_restart_to_allocatable_ms", gaps)


def test_a_killed_daemon_turns_the_devices_unhealthy_and_they_come_back(
    manager: DeviceManager,
    start_plugin: Callable[..., PluginProcess],
    daemon: Daemon,
    gpus: Simulator,
    nvml: FakeNvml,
    start_daemon: Callable[..., Daemon],
    subscribe: Callable[[Daemon], Subscription],
) -> None:
    start_plugin()
    manager.wait(capacity=2, allocatable=2)
    began = time.time_ns()
    daemon.kill()
    down = manager.wait(capacity=2, allocatable=0)
    down_ms = (down["received_unix_ns"] - began) / 1e6
    began = time.time_ns()
    again = start_daemon(
        "--udev-source", "udev", env={**gpus.daemon_env(), **nvml.env()}, nvml=True
    )
    named(subscribe(again), A, B)
    back = manager.wait(capacity=2, allocatable=2, timeout=30)
    back_ms = (back["received_unix_ns"] - began) / 1e6
    keep("daemon_killed_to_unallocatable_ms", round(down_ms, 1))
    keep("daemon_restart_to_allocatable_ms", round(back_ms, 1))
    record(
        "Faults",
        "The daemon killed (SIGKILL) under the kubelet plugin, then started again",
        "2 GPUs registered with the kubelet's own device manager; 1 kill, 1 restart",
        f"capacity kept at 2, allocatable 0 {down_ms:.0f} ms after the kill; allocatable 2 "
        f"again {back_ms:.0f} ms after the restart began; the plugin never exited",
    )


def test_allocate_names_the_cdi_devices_for_kubelets_that_take_them(
    manager: DeviceManager,
    gpus: Simulator,
    nvml: FakeNvml,
    start_daemon: Callable[..., Daemon],
    subscribe: Callable[[Daemon], Subscription],
    tmp_path: Path,
    dirs: dict[str, Path],
) -> None:
    with_cdi = start_daemon(
        "--udev-source", "udev", "--cdi-dir", str(tmp_path / "cdi"),
        env={**gpus.daemon_env(), **nvml.env()}, nvml=True, socket=tmp_path / "cdi.sock",
    )  # fmt: skip
    named(subscribe(with_cdi), A, B)
    plugin = PluginProcess(
        ["--socket", str(with_cdi.socket), "--kubelet-dir", str(dirs["plugins"])],
        tmp_path / "plugin-cdi.log",
    )
    try:
        manager.wait(capacity=2, allocatable=2)
        # kubelet 1.20 has no cdi_devices field and skips it: its Allocate works as before.
        one = manager.request("allocate", pod="cdi", resource=RESOURCE, count=1)
        assert "error" not in one, one
        # A newer kubelet reads field 5: ask the plugin's socket as it would.
        channel = grpc.insecure_channel(f"unix://{dirs['plugins'] / Options().endpoint(RESOURCE)}")
        with channel:
            answer = api_grpc.DevicePluginStub(channel).Allocate(
                api.AllocateRequest(
                    container_requests=[api.ContainerAllocateRequest(devicesIDs=[B])]
                ),
                timeout=10,
            )
        (container,) = answer.container_responses
        assert [c.name for c in container.cdi_devices] == [f"hotplug-monitor.io/gpu={B}"]
        assert dict(container.envs) == {"NVIDIA_VISIBLE_DEVICES": UUIDS[B]}
    finally:
        assert plugin.stop() == 0, plugin.log()

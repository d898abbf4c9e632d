"""Level 2: the real kubelet binary runs a pod that asks for a GPU of the plugin.

The kubelet (Debian's kubernetes 1.20.2 source, built by build.sh and cached), Debian's
containerd 1.6 and runc, and ``hotplug-monitor kubelet-plugin`` run in a mount namespace of
their own (tests/host/kubelet/node.py); the daemon runs outside it on simulated GPUs (umockdev)
with the NVML stand-in. The pod's container shows what it got (its environment and device
nodes) in its log; then a GPU is removed and the kubelet's admission refuses a second pod for
want of the resource.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from monitor.sim.nvml import FakeGpu, FakeNvml
from monitor.sim.umockdev import Simulator
from monitor.wire import requests
from tests.conftest import Daemon, Subscription, need
from tests.host.kubelet.harness import RESOURCE, Driven, build, plugin_env
from tests.host.kubelet.node import NODE_NAME, SHELL_IMAGE
from tests.host.kubelet.test_devicemanager import keep
from tests.reliability import record
from tests.waiting import wait_until

pytestmark = [pytest.mark.umockdev, pytest.mark.kubelet_node]

A, B = "0000:3b:00.0", "0000:86:00.0"
UUIDS = {
    A: "GPU-0a0a0a0a-1111-2222-3333-444444444444",
    B: "GPU-0b0b0b0b-5555-6666-7777-888888888888",
}
MINORS = {A: 0, B: 1}


def missing() -> str | None:
    for tool in ("containerd", "ctr", "runc", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install containerd runc util-linux)"
    if not Path("/bin/busybox").is_file():
        return "busybox-static not installed (apt-get install busybox-static)"
    return None


@pytest.fixture(scope="module")
def kubelet_binary() -> Path:
    need(missing())
    return build("kubelet")


@pytest.fixture
def daemon(
    sim: Simulator,
    tmp_path: Path,
    nvml_lib: Path,
    start_daemon: Callable[..., Daemon],
    subscribe: Callable[[Daemon], Subscription],
) -> tuple[Daemon, Simulator]:
    nvml = FakeNvml(
        tmp_path / "nvml",
        nvml_lib,
        [FakeGpu(bus_id=a, uuid=UUIDS[a], minor=MINORS[a]) for a in (A, B)],
    )
    sim.add("nvidia-h100", A, 0)
    sim.add("nvidia-h100", B, 0)
    started = start_daemon(
        "--udev-source", "udev", env={**sim.daemon_env(), **nvml.env()}, nvml=True
    )

    def named(mirror: Any) -> bool:
        found = mirror.devices()
        return all(
            a in found and found[a][1]["attributes"].get("uuid", {}).get("value") == UUIDS[a]
            for a in (A, B)
        )

    subscribe(started).until(named, timeout=20)
    return started, sim


@pytest.fixture
def node(kubelet_binary: Path) -> Iterator[tuple[Driven, Path]]:
    top = Path(tempfile.mkdtemp(prefix="hm-node-"))
    command = ["unshare", "-m", "--propagation", "private", "--"]
    command += [sys.executable, "-m", "tests.host.kubelet.node"]
    driven = Driven(command, plugin_env(), top / "node.log")
    yield driven, top
    try:
        assert "error" not in driven.request("teardown", timeout=60)
    finally:
        driven.close()
        shutil.rmtree(top, ignore_errors=True)


def pods(kubelet: str) -> dict[str, dict[str, Any]]:
    """The pods the kubelet (its read-only address) runs, by name."""
    with urllib.request.urlopen(f"{kubelet}/pods", timeout=5) as answer:
        listed = json.loads(answer.read())
    return {p["metadata"]["name"]: p for p in listed.get("items") or []}


def phase_of(kubelet: str, name: str) -> tuple[str, str, str]:
    pod = pods(kubelet).get(f"{name}-{NODE_NAME}", {})
    status = pod.get("status", {})
    return status.get("phase", ""), status.get("reason", ""), status.get("message", "")


def until_phase(
    kubelet: str, name: str, *phases: str, timeout: float = 120
) -> tuple[str, str, str]:
    return wait_until(
        lambda: found if (found := phase_of(kubelet, name))[0] in phases else None,
        timeout,
        lambda: f"{name} {phases}: {phase_of(kubelet, name)}; {pods(kubelet)}",
        interval=0.2,
    )


def manifest(name: str, script: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "hostNetwork": True,
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": SHELL_IMAGE,
                    "imagePullPolicy": "Never",
                    "command": ["/bin/sh", "-c", script],
                    "resources": {"limits": {RESOURCE: "1"}},
                }
            ],
        },
    }


SHOW = (
    'echo "visible=$NVIDIA_VISIBLE_DEVICES"; '
    "for n in /dev/nvidia0 /dev/nvidia1 /dev/nvidiactl /dev/nvidia-uvm; do "
    'test -c "$n" && echo "char $n"; done; echo shown; sleep 3600'
)


def container_log(top: Path, name: str) -> str:
    found = sorted((top / "varlog" / "pods").glob(f"default_{name}-{NODE_NAME}_*/main/*.log"))
    return found[0].read_text(errors="replace") if found else ""


def test_a_pod_gets_the_gpu_and_a_removed_gpu_leaves_allocatable(
    node: tuple[Driven, Path], daemon: tuple[Daemon, Simulator], kubelet_binary: Path
) -> None:
    driven, top = node
    monitor, sim = daemon
    began = time.monotonic()
    ready = driven.request(
        "setup",
        timeout=180,
        top=str(top),
        kubelet=str(kubelet_binary),
        daemon_socket=str(monitor.socket),
        device_ids=[A, B],
        plugin_args=["--reconcile-interval", "1"],
    )
    assert "error" not in ready, (ready, driven.log(), _tail(top, "kubelet"))
    kubelet = ready["read_only"]
    dropped = driven.request("pod", name="gpu-one", manifest=manifest("gpu-one", SHOW))
    # Any end: fail now, with the log.
    first = until_phase(kubelet, "gpu-one", "Running", "Failed", "Succeeded")
    assert first[0] == "Running", (first, _tail(top, "kubelet"))
    running_s = time.monotonic() - began
    wait_until(
        lambda: "shown" in container_log(top, "gpu-one"),
        60,
        lambda: (
            f"output from gpu-one: {pods(kubelet).get(f'gpu-one-{NODE_NAME}')}\n"
            f"{sorted(str(p) for p in (top / 'varlog').rglob('*'))}\n"
            f"{container_log(top, 'gpu-one')}\n{_tail(top, 'kubelet')}"
        ),
        interval=0.2,
    )
    pod_s = (time.time_ns() - dropped["unix_ns"]) / 1e9
    with monitor.client() as client:
        leases = client.ask(requests.leases())["leases"]
    held = [d for lease in leases if lease["owner"] == "kubelet" for d in lease["devices"]]
    assert len(held) == 1, leases
    gpu = held[0]
    log = container_log(top, "gpu-one")
    # What the plugin's Allocate answered reached the container: the env and the device nodes.
    assert f"visible={UUIDS[gpu]}" in log, log
    assert f"char /dev/nvidia{MINORS[gpu]}" in log and "char /dev/nvidiactl" in log, log
    other = B if gpu == A else A
    assert f"char /dev/nvidia{MINORS[other]}" not in log, log  # the other GPU is not its
    metrics = _get(f"{kubelet}/metrics")
    assert (
        f'kubelet_device_plugin_alloc_duration_seconds_count{{resource_name="{RESOURCE}"}} 1'
        in (metrics)
    )
    # The other GPU leaves: allocatable drops to the one in use, so a second pod asking for one
    # is refused by the kubelet's admission.
    sim.remove(other)
    time.sleep(2)  # the plugin's ListAndWatch has told the kubelet; admission reads it
    driven.request("pod", name="gpu-two", manifest=manifest("gpu-two", SHOW))
    phase, reason, message = until_phase(kubelet, "gpu-two", "Failed", "Running", timeout=60)
    assert phase == "Failed", (phase, reason, _tail(top, "kubelet"))
    assert reason.startswith("OutOf") or reason == "UnexpectedAdmissionError", reason
    assert RESOURCE in message, message
    print(f"gpu-two: {reason}: {message}")
    assert phase_of(kubelet, "gpu-one")[0] == "Running"
    keep(
        "node",
        {
            "setup_s": ready["setup_s"],
            "kubelet_socket_s": ready["kubelet_socket_s"],
            "registered_s": ready["registered_s"],
            "manifest_to_container_output_s": round(pod_s, 1),
            "start_to_running_s": round(running_s, 1),
        },
    )
    record(
        "Faults",
        "The real kubelet (1.20.2) with containerd and runc runs a pod asking for a GPU",
        "2 simulated H100s; 1 pod, then one GPU removed and a second pod",
        f"the pod ran {pod_s:.1f} s after its manifest with NVIDIA_VISIBLE_DEVICES and its "
        f"/dev/nvidia{MINORS[gpu]}; after the removal the second pod was refused ({reason})",
    )


def _tail(top: Path, name: str) -> str:
    path = top / f"{name}.log"
    return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return str(answer.read().decode(errors="replace"))

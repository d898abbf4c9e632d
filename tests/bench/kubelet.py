"""Scenario 12: the Kubernetes device plugin, through the kubelet's own device manager (Debian's
kubernetes 1.20.2 source, driven by tests/host/kubelet/devicemanager_test.go).

- hot-add (and removal) of a simulated GPU -> the ListAndWatch message reaching the device
  manager, and its capacity once applied (the kubelet writes its checkpoint file first),
  beside a plain subscriber of the daemon in another process, on the same events. For
  comparison: Intel's device plugins rescan sysfs every 5 s; NVIDIA's k8s-device-plugin lists
  its GPUs once at start and sees no hot-add until it is restarted;
- the device manager restarted (as a kubelet restart: every socket in its directory removed,
  a new kubelet.sock) -> the plugin registered again and its devices allocatable;
- the plugin started -> allocatable (fork+exec, follow the daemon, serve, register).

Both clocks are CLOCK_MONOTONIC: the umockdev helper stamps each command as it starts it, the
subscriber and the Go driver each change as they see it.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from tests.bench.common import Daemon, Results, Row, Stats, SubscriberProcess
from tests.bench.simulated import TimedSimulator, simulated
from tests.host.kubelet.harness import RESOURCE, DeviceManager, PluginProcess, build

SCENARIO = "12 Kubernetes plugin"
HOTPLUGGED = "0000:c1:00.0"
INTEL_SCAN_MS = 5_000  # intel-device-plugins-for-kubernetes: its GPU plugin's scan period


def _monotonic_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def kubelet_plugin(
    results: Results, workdir: Path, samples: int, restarts: int, quick: bool
) -> None:
    try:
        binary = build("devicemanager")
    except BaseException as error:  # not built here (no Go, not root): say so in the table
        results.add(
            Row(SCENARIO, "not run", f"{type(error).__name__}: {error}"[:200], verdict="n/a")
        )
        return
    sim: TimedSimulator = simulated(
        [("nvidia-h100", "0000:3b:00.0"), ("nvidia-h100", "0000:86:00.0")]
    )
    top = Path(tempfile.mkdtemp(prefix="hm-bench-k-"))  # short: socket paths
    plugins = top / "device-plugins"
    latency: dict[str, list[int]] = {
        "kubelet": [],
        "applied": [],
        "subscriber": [],
        "kubelet_remove": [],
    }
    starts: list[int] = []
    again: list[int] = []
    try:
        with Daemon(
            workdir, ["--udev-source", "udev"], env=sim.daemon_env(), log_level="warning"
        ) as daemon:
            manager = DeviceManager(binary, workdir / "devicemanager.log")
            try:
                started = manager.request(
                    "start", socket=str(plugins / "kubelet.sock"), numa_nodes=[0, 1]
                )
                assert started == {"ok": True}, started
                print(f"[{SCENARIO}] {restarts} starts and restarts, {samples} hot-adds")
                for i in range(restarts + 1):  # the first warms the page cache, unrecorded
                    began = _monotonic_ns()
                    plugin = PluginProcess(
                        ["--socket", str(daemon.socket), "--kubelet-dir", str(plugins)],
                        workdir / f"plugin-{i}.log",
                    )
                    ready = manager.wait(RESOURCE, capacity=2, allocatable=2, timeout=30)
                    if i:
                        starts.append(ready["received_mono_ns"] - began)
                    if i < restarts:
                        plugin.stop()
                        manager.wait(RESOURCE, allocatable=0, timeout=30)
                for _ in range(restarts):
                    restarted = manager.request("restart")
                    back = manager.wait(RESOURCE, capacity=2, allocatable=2, timeout=30)
                    again.append(back["received_mono_ns"] - restarted["restarted_mono_ns"])
                subscriber = SubscriberProcess(daemon.socket)
                try:
                    for i in range(samples + 5):  # the first 5 warm up, unrecorded
                        start = sim.timed(
                            "add", kind="nvidia-h100", address=HOTPLUGGED, numa_node=0
                        )
                        added = manager.wait(RESOURCE, capacity=3, allocatable=3, timeout=10)
                        while (seen := subscriber.next(timeout=10)).devices != 3:
                            pass
                        removed_at = sim.timed("remove", address=HOTPLUGGED)
                        removed = manager.wait(RESOURCE, capacity=2, timeout=10)
                        while subscriber.next(timeout=10).devices != 2:
                            pass
                        if i >= 5:
                            latency["kubelet"].append(added["message_mono_ns"] - start)
                            latency["applied"].append(added["received_mono_ns"] - start)
                            latency["subscriber"].append(seen.t_ns - start)
                            latency["kubelet_remove"].append(
                                removed["received_mono_ns"] - removed_at
                            )
                finally:
                    subscriber.stop()
                    plugin.stop()
            finally:
                manager.close()
    finally:
        sim.close()
        shutil.rmtree(top, ignore_errors=True)
    plugin_stats = Stats.of_ns(latency["kubelet"])
    plain = Stats.of_ns(latency["subscriber"])
    results.latency(
        SCENARIO, "simulated GPU hot-add -> ListAndWatch message in the kubelet's device manager",
        plugin_stats, quick=quick,
    )  # fmt: skip
    results.latency(
        SCENARIO, "the same -> in its capacity (after the kubelet writes its checkpoint file)",
        Stats.of_ns(latency["applied"]), quick=quick,
    )  # fmt: skip
    results.latency(
        SCENARIO, "simulated GPU removal -> the kubelet's device manager",
        Stats.of_ns(latency["kubelet_remove"]), quick=quick,
    )  # fmt: skip
    results.ratio(
        SCENARIO, "ratio kubelet plugin / plain subscriber (same hot-adds)", plugin_stats, plain
    )
    results.add(
        Row(
            SCENARIO,
            "Intel's device plugins, for comparison",
            f"rescan sysfs every {INTEL_SCAN_MS:,} ms: a hot-add waits up to that; "
            f"x{INTEL_SCAN_MS / plugin_stats.p99_ms:,.0f} our p99",
            verdict="info",
            data={"period_ms": INTEL_SCAN_MS},
        )
    )
    results.add(
        Row(
            SCENARIO,
            "NVIDIA's k8s-device-plugin, for comparison",
            "none: it lists the GPUs once at start; a hot-added GPU is not offered until the "
            "plugin restarts (and an XID-unhealthy GPU never becomes healthy again)",
            verdict="info",
        )
    )
    restart = Stats.of_ns(again)
    results.latency(
        SCENARIO, "device manager restarted -> registered again, allocatable (target: 1 s)",
        restart, target_p99_ms=1000, quick=True,
    )  # fmt: skip
    results.latency(
        SCENARIO, "plugin started -> allocatable (exec, daemon, serve, register)",
        Stats.of_ns(starts), quick=True,
    )  # fmt: skip
    results.note(
        "scenario 12: daemon with --no-nvml (the GPU is named from udev's database at once); "
        "the kubelet side is the kubelet 1.20.2 device manager's own code in its test binary; "
        "the plugin looks at the kubelet's directory every 0.2 s"
    )

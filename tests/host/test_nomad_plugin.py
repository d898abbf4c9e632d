"""``hotplug-monitor nomad-plugin`` as Nomad runs it: go-plugin's real client (Debian's
golang-github-hashicorp-go-plugin-dev, driven by tests/nomad/host) launches it the way Nomad's
plugin loader does, against a real daemon on simulated GPUs (umockdev) with the NVML stand-in.

Every Fingerprint message is also checked the way the Nomad client checks one before it takes
the devices (``nomad_refuses``: empty, or the client would stop using the plugin).

Measured figures go to build/nomad-plugin.json (and are printed with ``-s``); the benchmark
(``python -m tests.bench --only 8``) measures them over many samples.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from monitor.adapters.nomad import goplugin
from monitor.sim.nvml import FakeGpu, FakeNvml
from monitor.sim.umockdev import Simulator
from monitor.wire import requests
from monitor.wire.errors import RpcError
from tests.conftest import Daemon, Subscription
from tests.nomad import host
from tests.reliability import record

pytestmark = pytest.mark.umockdev

REPO = Path(__file__).resolve().parents[2]
PLUGIN = [sys.executable, "-m", "monitor", "nomad-plugin"]
A, B, C = "0000:3b:00.0", "0000:86:00.0", "0000:af:00.0"
UUIDS = {
    A: "GPU-0a0a0a0a-1111-2222-3333-444444444444",
    B: "GPU-0b0b0b0b-5555-6666-7777-888888888888",
    C: "GPU-0c0c0c0c-9999-aaaa-bbbb-cccccccccccc",
}
H100 = "NVIDIA H100 80GB HBM3"
GRACELESS = "plugin failed to exit gracefully"

measured: dict[str, Any] = {}


def keep(name: str, value: Any) -> None:
    measured[name] = value
    out = REPO / "build" / "nomad-plugin.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(measured, indent=1) + "\n")
    print(f"{name}: {value}")


def fake_gpu(address: str, minor: int) -> FakeGpu:
    gpu = FakeGpu(bus_id=address, uuid=UUIDS[address], minor=minor)
    if address == A:  # statistics no other figure of A has (each sample reports them)
        gpu = attrs.evolve(
            gpu, util_gpu=71, memory_used_mib=40960, temperature_c=64, power_mw=412345
        )
    return gpu


@pytest.fixture
def nvml(tmp_path: Path, nvml_lib: Path) -> FakeNvml:
    return FakeNvml(tmp_path / "nvml", nvml_lib, [fake_gpu(A, 0), fake_gpu(B, 1)])


@pytest.fixture
def gpus(sim: Simulator) -> Simulator:
    sim.add("nvidia-h100", A, 0)
    sim.add("nvidia-h100", B, 1)
    return sim


def enriched(sub: Subscription, *addresses: str) -> None:
    """Wait until NVML has named and described each of ``addresses``."""

    def named(mirror: Any) -> bool:
        found = mirror.devices()
        return all(
            a in found and found[a][1]["attributes"].get("uuid", {}).get("value") == UUIDS[a]
            for a in addresses
        )

    sub.until(named, timeout=20)


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
    enriched(subscribe(started), A, B)
    return started


def plugin_env() -> dict[str, str]:
    """The host's environment: go-plugin adds the cookie and versions itself."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PLUGIN_", "NOMAD_"))}


class Nomad:
    """The Go host with one launched plugin: Nomad's side of every call."""

    def __init__(self, binary: Path) -> None:
        self.host = host.GoPluginHost(binary, env=plugin_env())
        self.launched: dict[str, Any] = {}

    def launch(self, *args: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
        self.launched = self.host.request(
            "launch", cmd=[*PLUGIN, *args], config=config or {}, dir=str(REPO)
        )
        return self.launched

    def next(self, timeout_ms: int = 10_000) -> dict[str, Any]:
        """The next Fingerprint message (the stream opens on first use)."""
        got = self.host.request("fingerprint_next", timeout_ms=timeout_ms)
        if "message" in got:
            assert got["nomad_refuses"] == [], got
        return got

    def until(
        self, condition: Callable[[dict[str, Any]], bool], timeout: float = 20.0
    ) -> dict[str, Any]:
        """Fingerprint messages until one satisfies ``condition`` (given the devices by ID)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            got = self.next(timeout_ms=max(1, int(left * 1000)))
            assert "message" in got or got.get("code") == "Timeout", got
            if "message" in got and condition(devices(got)):
                return got
        raise AssertionError("no Fingerprint message met the condition")

    def reserve(self, *ids: str) -> dict[str, Any]:
        return self.host.request("reserve", ids=list(ids))

    def log(self) -> list[dict[str, Any]]:
        return [e for e in self.host.request("logs")["host_log"] if isinstance(e, dict)]

    def close(self) -> None:
        if self.host.request("ping").get("ok"):
            self.host.request("kill")
        self.host.close()


@pytest.fixture
def nomad() -> Iterator[Nomad]:
    running = Nomad(host.for_tests().binary)
    yield running
    running.close()


def devices(got: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The devices of a Fingerprint message by ID, each with its group's name."""
    return {
        d["ID"]: {**d, "group": g["device_name"], "healthy": d.get("healthy", False)}
        for g in got["message"].get("device_group", [])
        for d in g.get("devices", [])
    }


def groups(got: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        f"{g['vendor']}/{g['device_type']}/{g['device_name']}": g
        for g in got["message"].get("device_group", [])
    }


class CountingListener:
    """A Unix socket that counts who connects (and hangs up on them): where a plugin that
    should not ask the daemon anything would have to knock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.connections = 0
        self._sock = socket.socket(socket.AF_UNIX)
        self._sock.bind(str(path))
        self._sock.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._sock.close()


def test_nomads_three_launches_are_quick_and_the_short_ones_leave_the_daemon_alone(
    nomad: Nomad, tmp_path: Path
) -> None:
    listener = CountingListener(tmp_path / "d.sock")
    try:
        launched = nomad.launch(config={"socket": str(listener.path)})
        assert "error" not in launched, launched
        stages = {s["stage"]: s for s in launched["stages"]}
        assert list(stages) == ["fingerprint", "validate", "run"]
        info = stages["fingerprint"]["plugin_info"]
        assert info["type"] == "DEVICE" and info["plugin_api_versions"] == ["v0.1.0"]
        assert info["name"] == "hotplug-monitor"
        schema = stages["fingerprint"]["config_schema"]["spec"]["object"]["attributes"]
        assert set(schema) == {
            "socket",
            "ignored_device_ids",
            "groups",
            "nomad_address",
            "nomad_token_file",
            "reconcile_interval",
        }
        assert stages["fingerprint"]["exited"] and stages["validate"]["exited"]
        # Fingerprinting the plugin, validating its config and configuring the long-lived
        # one asked the daemon nothing: no connection at all.
        assert listener.connections == 0
        # The first Fingerprint message comes at once, though nobody answers there.
        first = nomad.next(timeout_ms=5000)
        assert first["message"] == {}  # no devices known yet
        assert listener.connections >= 1
    finally:
        listener.close()
    entries = nomad.log()
    assert not any(e.get("@message") == GRACELESS for e in entries)
    configured = [e for e in entries if e.get("@message") == "configured"]
    assert [e["phase"] for e in configured] == ["validate", "validate", "run"]
    assert all(e["socket"] == str(listener.path) for e in configured)
    keep(
        "launch_ms",
        {
            name: {k: stage[k] for k in ("handshake_ms", "kill_ms") if k in stage}
            for name, stage in stages.items()
        },
    )


def test_fingerprint_names_as_nomad_device_nvidia_and_a_hot_add_is_one_message(
    nomad: Nomad, daemon: Daemon, gpus: Simulator, nvml: FakeNvml
) -> None:
    assert "error" not in nomad.launch("--socket", str(daemon.socket))
    first = nomad.next()
    group = groups(first)[f"nvidia/gpu/{H100}"]
    attributes = group["attributes"]
    # Names and units of nomad-device-nvidia's fingerprint, so job constraints carry over.
    for name, unit in (
        ("memory", "MiB"), ("bar1", "MiB"), ("power", "W"), ("cores_clock", "MHz"),
        ("memory_clock", "MHz"), ("pci_bandwidth", "MB/s"),
    ):  # fmt: skip
        assert attributes[name]["unit"] == unit, name
        assert int(attributes[name]["int_val"]) > 0
    for name in ("driver_version", "display_state", "persistence_mode"):
        assert attributes[name]["string_val"], name
    assert attributes["memory"]["int_val"] == "81559"  # int64 in protobuf's JSON
    found = devices(first)
    assert set(found) == {A, B}
    assert all(d["healthy"] and d["hw_locality"]["pci_bus_id"] == i for i, d in found.items())
    # Never periodic: nothing comes while nothing changes.
    assert nomad.next(timeout_ms=500)["code"] == "Timeout"
    # A hot-added GPU (NVML knows it) reaches Nomad as soon as the daemon has named it.
    nvml.set_gpus([fake_gpu(A, 0), fake_gpu(B, 1), fake_gpu(C, 2)])
    began = time.time_ns()
    gpus.add("nvidia-h100", C, 1)
    added = nomad.until(lambda d: C in d and d[C]["group"] == H100)
    keep("hot_add_to_fingerprint_ms", round((added["received_unix_ns"] - began) / 1e6, 1))
    assert devices(added)[C]["healthy"]
    began = time.time_ns()
    gpus.remove(C)
    removed = nomad.until(lambda d: C not in d)
    keep("remove_to_fingerprint_ms", round((removed["received_unix_ns"] - began) / 1e6, 1))
    assert set(devices(removed)) == {A, B}


def test_a_pci_error_turns_a_device_unhealthy_until_it_recovers(
    nomad: Nomad, daemon: Daemon, gpus: Simulator
) -> None:
    assert "error" not in nomad.launch(config={"socket": str(daemon.socket)})
    nomad.until(lambda d: d.get(A, {}).get("healthy") is True)
    gpus.pci_error(A, "BEGIN_RECOVERY")
    broken = devices(nomad.until(lambda d: not d[A]["healthy"]))
    assert broken[A]["health_description"] == "PCI error: recovery in progress, device offline"
    assert broken[B]["healthy"]
    # Nomad's Reserve of it is refused with the daemon's own sentence.
    with daemon.client() as client, pytest.raises(RpcError) as said:
        client.ask(requests.reserve([A], owner="nomad"))
    refused = nomad.reserve(A)
    assert refused["code"] == "FailedPrecondition"
    assert refused["error"] == said.value.message
    gpus.pci_error(A, "SUCCESSFUL_RECOVERY")
    assert "health_description" not in devices(nomad.until(lambda d: d[A]["healthy"]))[A]


def test_reserve_returns_the_edits_and_nomads_second_reserve_replaces_its_lease(
    nomad: Nomad, daemon: Daemon
) -> None:
    assert "error" not in nomad.launch(config={"socket": str(daemon.socket)})
    nomad.next()
    first = nomad.reserve(A)
    res = first["message"]["container_res"]
    # As nomad-device-nvidia: the GPUs by UUID, for the NVIDIA container runtime.
    assert res["envs"] == {"NVIDIA_VISIBLE_DEVICES": UUIDS[A]}
    nodes = {d["host_path"]: d for d in res["devices"]}
    assert {"/dev/nvidia0", "/dev/nvidiactl", "/dev/nvidia-uvm"} <= set(nodes)
    assert all(d["task_path"] == p and d["permissions"] == "rwm" for p, d in nodes.items())
    assert "/dev/nvidia1" not in nodes  # B's node is B's
    assert all(m["read_only"] for m in res["mounts"])
    with daemon.client() as client:
        leases = client.ask(requests.leases())["leases"]
    assert [(sorted(lease["devices"]), lease["owner"]) for lease in leases] == [([A], "nomad")]
    # A device held by Nomad stays healthy for Nomad: it decides among its own tasks.
    assert nomad.next(timeout_ms=500).get("code") == "Timeout"
    # Nomad reserves A again (a new task on it; the old one ended without telling anyone).
    second = nomad.reserve(A, B)
    assert second["message"]["container_res"]["envs"] == {
        "NVIDIA_VISIBLE_DEVICES": f"{UUIDS[A]},{UUIDS[B]}"
    }
    with daemon.client() as client:
        after = client.ask(requests.leases())["leases"]
    assert [(sorted(lease["devices"]), lease["owner"]) for lease in after] == [([A, B], "nomad")]
    assert after[0]["reservation_id"] != leases[0]["reservation_id"]
    # An unknown device: a gRPC error with the daemon's sentence.
    with daemon.client() as client, pytest.raises(RpcError) as said:
        client.ask(requests.reserve(["0000:00:00.1"]))
    unknown = nomad.reserve("0000:00:00.1")
    assert (unknown["code"], unknown["error"]) == ("NotFound", said.value.message)
    keep("reserve_ms", first["ms"])


def test_stats_are_the_daemons_numbers_at_nomads_interval_as_nomads_stat_objects(
    nomad: Nomad, daemon: Daemon
) -> None:
    assert "error" not in nomad.launch(config={"socket": str(daemon.socket)})
    nomad.next()
    got = [nomad.host.request("stats_next", interval_ms=1000, timeout_ms=10_000) for _ in range(3)]
    assert all("message" in g for g in got), got
    groups = got[-1]["message"]["groups"]
    assert [(g["vendor"], g["type"], g["name"]) for g in groups] == [("nvidia", "gpu", H100)]
    instances = groups[0]["instance_stats"]
    assert set(instances) == {A, B}
    values = instances[A]["stats"]["attributes"]
    # Wrapper values arrive as JSON numbers (int64 as strings), with Nomad's units.
    assert values["GPU utilization"]["int_numerator_val"] == "71"
    assert values["GPU utilization"]["unit"] == "%"
    assert values["Temperature"]["int_numerator_val"] == "64"
    assert values["Temperature"]["unit"] == "C"
    assert values["Power usage"]["unit"] == "W"
    assert float(values["Power usage"]["float_numerator_val"]) == pytest.approx(412.345)
    memory = values["Memory state"]
    assert (memory["int_numerator_val"], memory["int_denominator_val"]) == ("40960", "81559")
    assert memory["unit"] == "MiB"
    assert instances[A]["summary"] == memory  # used of total, as nomad-device-nvidia's
    assert values["GPU utilization"]["desc"]
    # One sample per interval, each stamped with its own time.
    stamps = [g["message"]["groups"][0]["instance_stats"][A]["timestamp"] for g in got]
    assert len(set(stamps)) == 3
    keep(
        "stats_gaps_ms",
        [
            round((b["received_unix_ns"] - a["received_unix_ns"]) / 1e6)
            for a, b in itertools.pairwise(got)
        ],
    )


def test_a_device_held_outside_nomad_is_unhealthy_naming_the_holder(
    nomad: Nomad, daemon: Daemon
) -> None:
    assert "error" not in nomad.launch(config={"socket": str(daemon.socket)})
    nomad.next()
    with daemon.client() as client:
        lease = client.ask(requests.reserve([B], owner="kubelet"))["reservation_id"]
    held = devices(nomad.until(lambda d: not d[B]["healthy"]))
    assert (
        held[B]["health_description"]
        == f"reserved outside Nomad (reservation {lease}, owner kubelet)"
    )
    assert held[A]["healthy"]
    refused = nomad.reserve(B)
    assert refused["code"] == "FailedPrecondition" and lease in refused["error"]
    with daemon.client() as client:
        client.ask(requests.release(reservation_id=lease, owner="kubelet"))
    nomad.until(lambda d: d[B]["healthy"])


def test_a_killed_daemon_turns_the_devices_unhealthy_and_they_come_back(
    nomad: Nomad,
    daemon: Daemon,
    gpus: Simulator,
    nvml: FakeNvml,
    start_daemon: Callable[..., Daemon],
    subscribe: Callable[[Daemon], Subscription],
) -> None:
    assert "error" not in nomad.launch(config={"socket": str(daemon.socket)})
    nomad.until(lambda d: set(d) == {A, B} and all(x["healthy"] for x in d.values()))
    began = time.time_ns()
    daemon.kill()
    down = nomad.until(lambda d: not any(x["healthy"] for x in d.values()))
    down_ms = (down["received_unix_ns"] - began) / 1e6
    assert set(devices(down)) == {A, B}  # kept, not vanished
    assert {x["health_description"] for x in devices(down).values()} == {
        "hotplug-monitor daemon not reachable"
    }
    refused = nomad.reserve(A)
    assert refused["code"] == "Unavailable"
    assert refused["error"].startswith("hotplug-monitor daemon not reachable: ")
    began = time.time_ns()
    again = start_daemon(
        "--udev-source", "udev", env={**gpus.daemon_env(), **nvml.env()}, nvml=True
    )
    enriched(subscribe(again), A, B)
    back = nomad.until(lambda d: set(d) == {A, B} and all(x["healthy"] for x in d.values()))
    back_ms = (back["received_unix_ns"] - began) / 1e6
    assert nomad.host.request("ping")["ok"] is True  # the plugin never exited
    assert "container_res" in nomad.reserve(A)["message"]  # and reserves again
    keep("daemon_killed_to_unhealthy_ms", round(down_ms, 1))
    keep("daemon_restart_to_healthy_ms", round(back_ms, 1))
    record(
        "Faults",
        "The daemon killed (SIGKILL) under the Nomad plugin, then started again",
        "2 GPUs offered to go-plugin's real client; 1 kill, 1 restart",
        f"both devices kept and unhealthy 'hotplug-monitor daemon not reachable' {down_ms:.0f} ms "
        f"after the kill; Reserve refused (Unavailable); healthy again {back_ms:.0f} ms after "
        "the restart began; the plugin and its Fingerprint stream never ended",
    )


def test_the_config_block_and_flags_choose_what_is_offered_and_a_bad_one_is_refused(
    nomad: Nomad, daemon: Daemon, gpus: Simulator, subscribe: Callable[[Daemon], Subscription]
) -> None:
    gpus.add("amd-mi300x", C, 0)
    subscribe(daemon).until(lambda m: C in m.devices())
    config = {
        "socket": str(daemon.socket),
        "ignored_device_ids": [UUIDS[B]],
        "groups": ["nvidia/gpu"],
    }
    assert "error" not in nomad.launch(config=config)
    offered = nomad.next()
    assert set(devices(offered)) == {A}
    refused = nomad.reserve(B)
    assert refused["code"] == "FailedPrecondition"
    assert refused["error"] == f"{B} is not offered to Nomad: its UUID is in ignored_device_ids"
    nomad.host.request("kill")
    # --offer in the plugin block's args wins over its config's groups.
    assert "error" not in nomad.launch("--offer", "amd/gpu", config=config)
    assert set(devices(nomad.next())) == {C}
    nomad.host.request("kill")
    # A config the plugin cannot use fails Nomad's validation launch with its sentence.
    bad = nomad.launch(config={"socket": "relative.sock"})
    assert (bad["stage"], bad["code"]) == ("validate", "InvalidArgument")
    assert bad["error"] == "socket must be an absolute path, not 'relative.sock'"
    bad = nomad.launch("--ignore-device", "GPU 0", config={})
    assert (bad["stage"], bad["code"]) == ("validate", "InvalidArgument")
    assert "'GPU 0' is neither a PCI address" in bad["error"]
    # A key the schema does not have is refused by Nomad itself, before the plugin sees it.
    unknown = nomad.launch(config={"fingerprint_period": "1m"})
    assert "Unsupported argument" in unknown["error"]


def test_run_by_hand_it_says_what_it_is_in_one_line() -> None:
    env = plugin_env()
    done = subprocess.run(PLUGIN, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert "Nomad device plugin" in done.stderr and "plugin_dir" in done.stderr
    assert goplugin.NOMAD.cookie_key not in done.stderr

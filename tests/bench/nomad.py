"""Scenario 10: the Nomad plugin, through go-plugin's real client (tests/nomad/host).

- hot-add (and removal) of a simulated GPU -> the Fingerprint message the client receives,
  beside a plain subscriber of the daemon in another process, on the same events; Nomad's own
  NVIDIA plugin looks every ``fingerprint_period`` (1 minute by default);
- Nomad's three launches of the plugin (fingerprint it, validate its config, run it): the time
  from fork+exec to go-plugin's handshake, and Kill to exit, of each.

Both clocks are CLOCK_MONOTONIC: the umockdev helper stamps each command as it starts it, the
subscriber and the Go host each message as they read it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tests.bench.common import REPO, Daemon, Results, Row, Stats, SubscriberProcess
from tests.bench.simulated import TimedSimulator, simulated
from tests.nomad import host

SCENARIO = "10 Nomad plugin"
PLUGIN = [sys.executable, "-m", "monitor", "nomad-plugin"]
HOTPLUGGED = "0000:c1:00.0"
NOMAD_PERIOD_MS = 60_000  # nomad-device-nvidia's default fingerprint_period, "1m"


def _host_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PLUGIN_", "NOMAD_"))}


def _devices(message: dict[str, object]) -> set[str]:
    groups = message.get("device_group", [])
    assert isinstance(groups, list)
    return {d["ID"] for g in groups for d in g.get("devices", [])}


def nomad_plugin(results: Results, workdir: Path, samples: int, launches: int, quick: bool) -> None:
    missing = host.missing_tools()
    if missing:
        results.add(Row(SCENARIO, "not run", missing, verdict="n/a"))
        return
    binary = host.build(REPO / "build" / "nomad-host").binary
    sim: TimedSimulator = simulated(
        [("nvidia-h100", "0000:3b:00.0"), ("nvidia-h100", "0000:86:00.0")]
    )
    try:
        with Daemon(
            workdir, ["--udev-source", "udev"], env=sim.daemon_env(), log_level="warning"
        ) as daemon:
            print(f"[{SCENARIO}] {launches} launches, {samples} hot-adds and removals")
            stages: dict[str, dict[str, list[int]]] = {}
            with host.GoPluginHost(binary, env=_host_env()) as nomad:
                for i in range(launches + 1):  # the first warms the page cache, unrecorded
                    launched = nomad.request(
                        "launch", cmd=[*PLUGIN, "--socket", str(daemon.socket)]
                    )
                    if "error" in launched:
                        raise RuntimeError(f"launch failed: {launched}")
                    if i < launches:
                        nomad.request("kill")  # the last stays up for the hot-adds
                    if i == 0:
                        continue
                    for stage in launched["stages"]:
                        times = stages.setdefault(stage["stage"], {"handshake": [], "kill": []})
                        times["handshake"].append(int(stage["handshake_ms"] * 1e6))
                        if "kill_ms" in stage:
                            times["kill"].append(int(stage["kill_ms"] * 1e6))
                subscriber = SubscriberProcess(daemon.socket)
                try:
                    first = nomad.request("fingerprint_next", timeout_ms=10_000)
                    present = _devices(first["message"])
                    latency: dict[str, list[int]] = {
                        "nomad": [],
                        "subscriber": [],
                        "nomad_remove": [],
                    }
                    for i in range(samples + 5):  # the first 5 warm up, unrecorded
                        for action in ("add", "remove"):
                            if action == "add":
                                start = sim.timed(
                                    "add", kind="nvidia-h100", address=HOTPLUGGED, numa_node=0
                                )
                                wanted = present | {HOTPLUGGED}
                            else:
                                start = sim.timed("remove", address=HOTPLUGGED)
                                wanted = present
                            while True:
                                got = nomad.request("fingerprint_next", timeout_ms=10_000)
                                if "message" not in got:
                                    raise RuntimeError(
                                        f"no Fingerprint message after {action}: {got}"
                                    )
                                if _devices(got["message"]) == wanted:
                                    break
                            while True:
                                seen = subscriber.next(timeout=10)
                                if seen.devices == len(wanted):
                                    break
                            if i >= 5:
                                key = "nomad" if action == "add" else "nomad_remove"
                                latency[key].append(got["received_mono_ns"] - start)
                                if action == "add":
                                    latency["subscriber"].append(seen.t_ns - start)
                finally:
                    subscriber.stop()
    finally:
        sim.close()
    plugin = Stats.of_ns(latency["nomad"])
    plain = Stats.of_ns(latency["subscriber"])
    results.latency(
        SCENARIO, "simulated GPU hot-add -> Fingerprint message in go-plugin's client", plugin,
        quick=quick,
    )  # fmt: skip
    removal = Stats.of_ns(latency["nomad_remove"])
    results.latency(SCENARIO, "simulated GPU removal -> Fingerprint message", removal, quick=quick)
    results.ratio(SCENARIO, "ratio Nomad plugin / plain subscriber (same hot-adds)", plugin, plain)
    results.add(
        Row(
            SCENARIO,
            "Nomad's own NVIDIA plugin (nomad-device-nvidia), for comparison",
            f"looks every fingerprint_period: up to {NOMAD_PERIOD_MS:,} ms by default (1m); "
            f"x{NOMAD_PERIOD_MS / plugin.p99_ms:,.0f} our p99",
            verdict="info",
            data={"period_ms": NOMAD_PERIOD_MS},
        )
    )
    for stage, times in stages.items():
        handshake = Stats.of_ns(times["handshake"])
        text = f"exec -> handshake {handshake.text()}"
        if times["kill"]:
            text += f"; Kill -> exited {Stats.of_ns(times['kill']).text()}"
        results.add(
            Row(
                SCENARIO, f"Nomad's '{stage}' launch (n={handshake.n})", text, data={"stage": stage}
            )
        )
    results.note(
        "scenario 10: daemon with --no-nvml (the GPU is named from udev's database at once); "
        "the Go host is go-plugin 1.0.1's client, launching 'python -m monitor nomad-plugin' "
        "three times as Nomad's loader does"
    )

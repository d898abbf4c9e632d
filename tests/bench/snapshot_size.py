"""Scenario 17, what more devices per GPU cost: the snapshot (fingerprint) of 64 GPUs offered as
4 time-sliced replicas each, as 7 MIG instances each, and as 7 MIG instances of 4 replicas each,
against the same 64 GPUs offered whole, in bytes, in the time to build and encode it, and in the
time one change takes to reach 100 subscribers.

Each layout is one daemon on 64 simulated H100s (umockdev, the stand-in NVML naming them);
rounds alternate a PCI error ``change`` uevent on one GPU (a health patch each way, to that GPU
and to each of its replicas). Per round: the time until each of the subscribers (one epoll loop
in this process) has read the patch, the patch's size, and two ``fingerprint`` calls: the first
after a change builds and encodes the snapshot, the second is answered from the daemon's cache.

A layout is one line of ``LAYOUTS``. MIG instances are shared only by a ``[[share]]`` rule naming
them, so a MIG layout with replicas gets one in a config file.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import attrs

from monitor.sim import mig
from monitor.sim.nvml import FakeNvml, build_library
from monitor.sim.umockdev import Simulator
from monitor.wire.framing import dumps
from tests.bench.common import Daemon, Results, Row, Stats, read_line
from tests.bench.fanout import SUBSCRIBE, Subscribers
from tests.bench.health_sweep import gpus, wait_named

SCENARIO = "17 snapshot size"
SUBSCRIBERS = 100
ENCODES = 50  # times the snapshot is encoded in this process, per layout


@dataclass(frozen=True)
class Layout:
    """``gpus`` H100s, each with ``mig`` MIG devices (0: not in MIG mode), each device offered
    as ``replicas`` time-sliced replicas (1: whole)."""

    label: str
    gpus: int = 64
    replicas: int = 1
    mig: int = 0


FLOOR = Layout("64 GPUs")
LAYOUTS = (
    FLOOR,
    Layout("64 GPUs x 4 replicas", replicas=4),
    Layout("64 GPUs x 7 MIG", mig=7),
    Layout("64 GPUs x 7 MIG x 4 replicas", mig=7, replicas=4),
)


def _mig(layout: Layout, nvml: FakeNvml, workdir: Path) -> list[str]:
    """Put every GPU in MIG mode with ``layout.mig`` 1g.10gb devices; the daemon's flags."""
    nvml.set_gpus(attrs.evolve(g, mig_mode=1) for g in gpus(layout.gpus))
    for g in gpus(layout.gpus):
        devices = [
            mig.h100_mig("1g.10gb", k, 7 + k, f"MIG-{g.minor:08x}-{k:04x}-4000-8000-0000000000bb")
            for k in range(layout.mig)
        ]
        nvml.set_mig(g.bus_id, devices, announce=False)
    minors = mig.write_mig_minors(workdir / "mig-minors", gpus=layout.gpus)
    args = ["--mig-minors", str(minors)]
    if layout.replicas > 1:
        config = workdir / "share-mig.toml"
        config.write_text(f'[[share]]\nmatch = "nvidia/mig"\nreplicas = {layout.replicas}\n')
        args += ["--config", str(config)]
    return args


@dataclass(frozen=True)
class Measured:
    devices: int
    snapshot_bytes: int
    patch_bytes: int
    encode: Stats  # the snapshot's dumps in this process
    built: Stats  # the first fingerprint call after a change
    cached: Stats  # the second
    fanout: Stats  # change -> each subscriber read its patch


def _call_ns(sock: socket.socket, request: bytes) -> tuple[int, bytes]:
    start = time.monotonic_ns()
    sock.sendall(request)
    line = read_line(sock)
    return time.monotonic_ns() - start, line


def measure(workdir: Path, sim: Simulator, library: Path, layout: Layout, rounds: int) -> Measured:
    nvml = FakeNvml(workdir / "nvml", library, gpus(layout.gpus))
    args = ["--udev-source", "udev", "--share-replicas", str(layout.replicas)]
    if layout.mig:
        args += _mig(layout, nvml, workdir)
    env = {**sim.daemon_env(), **nvml.env()}
    address = gpus(layout.gpus)[0].bus_id
    fingerprint = b'{"jsonrpc":"2.0","id":2,"method":"fingerprint"}\n'
    with Daemon(workdir / "d", args, env=env, nvml=True, log_level="warning") as daemon:
        wait_named(daemon, layout.gpus)
        time.sleep(2.0)  # the first health reads and the start-up trim are past
        subscribers = Subscribers()
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        asker = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            subscribers.connect(daemon.socket, SUBSCRIBERS)
            raw.connect(str(daemon.socket))
            raw.sendall(SUBSCRIBE)
            read_line(raw)
            asker.connect(str(daemon.socket))
            _, answer = _call_ns(asker, fingerprint)
            result = json.loads(answer)["result"]
            snapshot_bytes = len(answer)
            devices = sum(len(g["devices"]) for g in result["snapshot"]["groups"].values())
            encode: list[int] = []
            for _ in range(ENCODES):
                start = time.monotonic_ns()
                dumps(result)
                encode.append(time.monotonic_ns() - start)
            generation = result["generation"]
            fanout: list[int] = []
            built: list[int] = []
            cached: list[int] = []
            patches: list[int] = []
            for i in range(rounds + 5):  # the first 5 unrecorded
                event = "BEGIN_RECOVERY" if i % 2 == 0 else "SUCCESSFUL_RECOVERY"
                generation += 1
                taken = subscribers.round(
                    lambda e=event: sim.pci_error(address, e),
                    generation,
                )
                patch = read_line(raw)
                first, line = _call_ns(asker, fingerprint)
                second, _ = _call_ns(asker, fingerprint)
                if json.loads(line)["result"]["generation"] != generation:
                    raise RuntimeError(f"round {i}: the fingerprint is not at {generation}")
                if i >= 5:
                    fanout += taken
                    built.append(first)
                    cached.append(second)
                    patches.append(len(patch))
                time.sleep(0.005)
        finally:
            subscribers.close()
            raw.close()
            asker.close()
    return Measured(
        devices, snapshot_bytes, max(patches), Stats.of_ns(encode), Stats.of_ns(built),
        Stats.of_ns(cached), Stats.of_ns(fanout),
    )  # fmt: skip


def snapshot_size(results: Results, workdir: Path, rounds: int) -> None:
    print(f"[{SCENARIO}] {', '.join(layout.label for layout in LAYOUTS)}: {rounds} changes "
          f"each to {SUBSCRIBERS} subscribers")  # fmt: skip
    library = build_library(workdir / "lib")
    measured: dict[Layout, Measured] = {}
    for layout in LAYOUTS:
        with Simulator() as sim:
            for gpu in gpus(layout.gpus):
                sim.add("nvidia-h100", gpu.bus_id, gpu.minor)
            measured[layout] = measure(
                workdir / layout.label.replace(" ", "-"), sim, library, layout, rounds
            )
    floor = measured[FLOOR]
    for layout, m in measured.items():
        _rows(results, layout, m, None if layout == FLOOR else floor)
    results.note(
        f"scenario 17: 64 simulated H100s (umockdev, the stand-in NVML); each change is a PCI "
        f"error uevent on one GPU, timed until each of {SUBSCRIBERS} subscribers (one epoll "
        "loop in the benchmark's process) has read its patch; 'built' is the first fingerprint "
        "call after the change (the daemon builds and encodes the snapshot), 'cached' the next"
    )


def _rows(results: Results, layout: Layout, m: Measured, floor: Measured | None) -> None:
    label = layout.label if floor is not None else f"{layout.label} (the floor)"
    data: dict[str, Any] = {"layout": asdict(layout), "devices": m.devices}
    size = f"{m.snapshot_bytes / 1024:.1f} KiB, patch {m.patch_bytes:,} B ({m.devices} devices)"
    if floor is not None:
        size += f", x{m.snapshot_bytes / floor.snapshot_bytes:.2f} the floor"
        size += f" (patch x{m.patch_bytes / floor.patch_bytes:.2f})"
    results.add(
        Row(SCENARIO, f"{label}: fingerprint answer, and one GPU's health patch", size,
            data=data | {"snapshot_bytes": m.snapshot_bytes, "patch_bytes": m.patch_bytes}),
    )  # fmt: skip
    for what, stats, base in (
        ("snapshot encoded (the daemon's dumps, in the benchmark's process)", m.encode,
         floor.encode if floor else None),
        ("fingerprint call after a change: built, encoded, answered", m.built,
         floor.built if floor else None),
        ("fingerprint call from the daemon's cache", m.cached, floor.cached if floor else None),
        (f"one change -> each of {SUBSCRIBERS} subscribers read its patch", m.fanout,
         floor.fanout if floor else None),
    ):  # fmt: skip
        value = f"{stats.text()} (n={stats.n})"
        extra: dict[str, Any] = asdict(stats)
        if base is not None:
            p50, p99 = stats.p50_ms / base.p50_ms, stats.p99_ms / base.p99_ms
            value += f"; x{p50:.2f} at p50, x{p99:.2f} at p99 the floor"
            extra |= {"ratio_p50": p50, "ratio_p99": p99}
        results.add(Row(SCENARIO, f"{label}: {what}", value, data=data | extra))

"""Scenario 16, the kernel-log reader (``--kmsg``): what an XID line costs on its way to a
subscriber, against a udev uevent on the same daemon, and what the reader costs when the log
says nothing.

- **Latency.** One daemon (8 simulated GPUs, umockdev; NVML off) reads a FIFO in /dev/kmsg's
  record format as its kernel log. Each round writes one driver XID line (XID 13: counted, the
  GPU stays healthy, so each makes a patch) and sends one PCI error ``change`` uevent (a health
  patch each way), alternating, and a subscriber in another process stamps each patch as it
  reads it. The uevent is the floor: the same daemon, the same subscriber, the same moments.
- **Idle.** Two daemons side by side over the same window, one reading an empty FIFO and one
  without ``--kmsg``: their context switches and CPU time. A reader that polls shows as wake-ups
  the other daemon does not have; the ``status`` counter proves no record came meanwhile.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from monitor.wire.blocking import Client
from tests.bench.common import Daemon, Results, Row, Stats, SubscriberProcess, now_ns
from tests.bench.profile import PySpy
from tests.bench.simulated import EIGHT_GPUS, TimedSimulator, simulated

SCENARIO = "16 kernel log reader"
TARGET_P99_MS = 5.0
WARM_UP = 20
PROFILED_LINES = 1000


def _xid_line(seq: int, slot: str) -> bytes:
    return f"4,{seq},0,-;NVRM: Xid (PCI:{slot}): 13, pid=1, name=bench, sample {seq}\n".encode()


def _patch(subscriber: SubscriberProcess, what: str) -> int:
    seen = subscriber.next(timeout=5)
    if seen.kind != "P":
        raise RuntimeError(f"{what}: the subscriber read {seen}")
    return seen.t_ns


def kmsg_reader(
    results: Results,
    workdir: Path,
    samples: int,
    idle_seconds: float,
    quick: bool,
    profiles: dict[str, Any] | None = None,
) -> None:
    sim = simulated(EIGHT_GPUS)
    try:
        latency(results, workdir / "latency", sim, samples, quick, profiles)
        idle(results, workdir / "idle", sim, idle_seconds)
    finally:
        sim.close()


def latency(
    results: Results,
    workdir: Path,
    sim: TimedSimulator,
    samples: int,
    quick: bool,
    profiles: dict[str, Any] | None,
) -> None:
    print(f"[{SCENARIO}] {samples} XID lines and {samples} uevents, alternating, one daemon")
    address = EIGHT_GPUS[0][1]
    slot = address[:-2]
    workdir.mkdir(parents=True, exist_ok=True)
    fifo = workdir / "kmsg"
    os.mkfifo(fifo)
    args = ["--udev-source", "udev", "--kmsg", str(fifo)]
    with Daemon(workdir, args, env=sim.daemon_env(), log_level="warning") as daemon:
        writer = os.open(fifo, os.O_WRONLY)
        subscriber = SubscriberProcess(daemon.socket)
        lat: dict[str, list[int]] = {"kmsg": [], "udev": []}
        try:
            for i in range(samples + WARM_UP):
                start = now_ns()
                os.write(writer, _xid_line(i, slot))
                line_ns = _patch(subscriber, f"XID line {i}") - start
                time.sleep(0.002)
                event = "BEGIN_RECOVERY" if i % 2 == 0 else "SUCCESSFUL_RECOVERY"
                start = sim.timed("pci_error", address=address, event=event)
                uevent_ns = _patch(subscriber, f"uevent {i}") - start
                time.sleep(0.002)
                if i >= WARM_UP:
                    lat["kmsg"].append(line_ns)
                    lat["udev"].append(uevent_ns)
            if profiles is not None:
                with PySpy(daemon.pid, workdir / "kmsg-profile.raw") as spy:
                    for i in range(PROFILED_LINES):
                        os.write(writer, _xid_line(samples + WARM_UP + i, slot))
                        _patch(subscriber, "profiled XID line")
                profiles["kernel log XID lines (one at a time)"] = spy.summary()
        finally:
            os.close(writer)
            subscriber.stop()
    kmsg, udev = Stats.of_ns(lat["kmsg"]), Stats.of_ns(lat["udev"])
    results.latency(
        SCENARIO, "XID line written to the kernel log -> subscriber (other process) reads the "
        "patch", kmsg, target_p99_ms=TARGET_P99_MS, quick=quick,
    )  # fmt: skip
    results.latency(
        SCENARIO, "floor: umockdev PCI error uevent -> patch, same daemon, alternating", udev,
        quick=quick,
    )  # fmt: skip
    p50, p99 = kmsg.p50_ms / udev.p50_ms, kmsg.p99_ms / udev.p99_ms
    results.add(
        Row(SCENARIO, "ratio XID line / uevent", f"x{p50:.2f} at p50, x{p99:.2f} at p99",
            "p99 <= x1.0", "met" if p99 <= 1.0 else "MISSED", {"p50": p50, "p99": p99}),
    )  # fmt: skip


def _records(daemon: Daemon) -> int:
    """The kernel log records the daemon has read (0 without a reader)."""
    with Client(daemon.socket) as client:
        return int(client.call("status")["kmsg_records"])


def _counters(daemon: Daemon) -> tuple[int, float]:
    switches = daemon.psutil.num_ctx_switches()
    return switches.voluntary + switches.involuntary, daemon.cpu_seconds()


def idle(results: Results, workdir: Path, sim: TimedSimulator, seconds: float) -> None:
    print(f"[{SCENARIO}] {seconds:.0f} s idle, reader on (an empty FIFO) and off, side by side")
    workdir.mkdir(parents=True, exist_ok=True)
    fifo = workdir / "kmsg"
    os.mkfifo(fifo)
    base = ["--udev-source", "udev"]
    env = sim.daemon_env()
    with (
        Daemon(workdir / "on", [*base, "--kmsg", str(fifo)], env=env, log_level="warning") as on,
        Daemon(workdir / "off", base, env=env, log_level="warning") as off,
    ):
        # Both asked for their status, then left alone past the allocator trim a second after
        # activity: the window holds only what an idle daemon does by itself.
        records_before = _records(on)
        _records(off)
        time.sleep(3.0)
        before = {"on": _counters(on), "off": _counters(off)}
        started = time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - started
        after = {"on": _counters(on), "off": _counters(off)}
        records = _records(on) - records_before
    if records:
        raise RuntimeError(f"{records} kernel log records read while idle")
    wakeups = {k: after[k][0] - before[k][0] for k in after}
    cpu = {k: after[k][1] - before[k][1] for k in after}
    extra = wakeups["on"] - wakeups["off"]
    # A reader that never wakes without a record switches context as often as no reader.
    results.add(
        Row(SCENARIO, f"context switches over {elapsed:.0f} s idle, no record: reader on / off",
            f"{wakeups['on']} / {wakeups['off']} ({extra:+d})", "no more with the reader on",
            "met" if extra <= 0 else "MISSED", {"seconds": elapsed, **wakeups}),
    )  # fmt: skip
    results.add(
        Row(SCENARIO, f"CPU over {elapsed:.0f} s idle: reader on / off",
            f"{100 * cpu['on'] / elapsed:.3f} % / {100 * cpu['off'] / elapsed:.3f} % of a core",
            data={"cpu_on_s": cpu["on"], "cpu_off_s": cpu["off"], "seconds": elapsed}),
    )  # fmt: skip

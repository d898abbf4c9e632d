"""Scenario 15, the NVML health watches: what reading every GPU's health conditions (row
remapping, retired pages, ECC, PCIe replays, clock slowdowns, NVLink) costs an idle daemon.

The daemon runs on 8 and on 64 simulated NVIDIA GPUs (umockdev, with the stand-in
libnvidia-ml), idle, no subscriber. Its CPU time and its NVML worker's are taken over a window
with the watches off (``--health-interval 0``: the floor), at the default interval (30 s), and
every second (the shortest interval allowed). The stand-in polls its scenario files inside every
event wait, which real NVML does not, so the floor is far above a real host's; the sweep's own
cost is what the watches add to it:

- **per read**: (CPU every second - CPU off) / (GPUs x window), the CPU one GPU's health read
  costs the daemon and the worker together;
- **at the default interval**: that cost x GPUs / 30 s, as % of one core. The direct figure at
  the default interval holds one sweep at most per window and is within the floor's noise; it
  is shown as its ratio to the floor.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from monitor.sim.nvml import FakeGpu, FakeNvml, build_library
from monitor.sim.umockdev import Simulator
from monitor.wire.blocking import Client
from monitor.wire.mirror import Mirror
from tests.bench.common import REPO, Daemon, Results, Row

SCENARIO = "15 health sweep"
COUNTS = (8, 64)
DEFAULT_INTERVAL = 30.0  # --health-interval's default
TARGET_PERCENT = 0.1  # of one core, the sweep at the default interval
SETTLE_SECONDS = 3.0  # after every GPU is named: the first sweep and start-up's trim are done
DIRECT_ROUNDS = 50  # sweeps of every GPU, called directly in a process of its own


@dataclass(frozen=True)
class Idle:
    """CPU seconds of the daemon and of its NVML worker over ``seconds``."""

    daemon_s: float
    worker_s: float
    seconds: float

    @property
    def percent(self) -> float:
        return 100 * (self.daemon_s + self.worker_s) / self.seconds


def gpus(count: int) -> list[FakeGpu]:
    return [
        FakeGpu(bus_id=f"0000:{i + 1:02x}:00.0", uuid=f"GPU-{i:08x}-0000-4000-8000-0000000000aa",
                minor=i)
        for i in range(count)
    ]  # fmt: skip


def _named(mirror: Mirror, count: int) -> bool:
    named = 0
    for _, device in mirror.devices().values():
        if device.get("attributes", {}).get("uuid", {}).get("value"):
            named += 1
    return named >= count


def wait_named(daemon: Daemon, count: int, timeout: float = 120.0) -> None:
    """Until NVML has named every GPU: its worker is watching them all."""
    deadline = time.monotonic() + timeout
    with Client(daemon.socket, timeout=timeout) as client:
        mirror = Mirror(client.call("subscribe"))
        notifications = client.notifications()
        while not _named(mirror, count):
            if time.monotonic() > deadline:
                raise TimeoutError(f"NVML did not name {count} GPUs in {timeout:g} s")
            mirror.apply(next(notifications))


def _worker_seconds(daemon: Daemon) -> float:
    children = daemon.psutil.children(recursive=True)
    if len(children) != 1:
        raise RuntimeError(f"{len(children)} processes under the daemon, not one NVML worker")
    times = children[0].cpu_times()
    return float(times.user + times.system)


INTERVALS = (("off", 0.0), ("default", None), ("1s", 1.0))  # None: the flag left out


def idle_cpu(
    workdir: Path, sim: Simulator, nvml: FakeNvml, count: int, window: float
) -> dict[str, Idle]:
    """Three idle daemons side by side, one per ``INTERVALS`` entry, over the same ``window``
    seconds: the machine's drift falls on all three alike."""
    env = {**sim.daemon_env(), **nvml.env()}
    with contextlib.ExitStack() as stack:
        daemons = {}
        for label, interval in INTERVALS:
            args = ["--udev-source", "udev"]
            if interval is not None:
                args += ["--health-interval", f"{interval:g}"]
            daemons[label] = stack.enter_context(
                Daemon(workdir / f"{count}-{label}", args, env=env, nvml=True,
                       log_level="warning")
            )  # fmt: skip
        for daemon in daemons.values():
            wait_named(daemon, count)
        time.sleep(SETTLE_SECONDS)
        before = {k: (d.cpu_seconds(), _worker_seconds(d)) for k, d in daemons.items()}
        started = time.monotonic()
        time.sleep(window)
        elapsed = time.monotonic() - started
        after = {k: (d.cpu_seconds(), _worker_seconds(d)) for k, d in daemons.items()}
    return {k: Idle(after[k][0] - before[k][0], after[k][1] - before[k][1], elapsed) for k in after}


@dataclass(frozen=True)
class PerRead:
    """CPU seconds of one GPU's health read in a process of its own on the stand-in, with no
    event waits beside it: called directly, and through the worker's own watch loop."""

    direct_s: float
    watched_s: float


def per_read(nvml: FakeNvml, count: int, window: float) -> PerRead:
    done = subprocess.run(
        [sys.executable, "-m", "tests.bench.health_sweep", str(count), f"{window:g}"],
        env={**os.environ, **nvml.env()}, cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    direct, watched = done.stdout.split()[-2:]
    return PerRead(float(direct), float(watched))


def health_sweep(results: Results, workdir: Path, window: float) -> None:
    print(f"[{SCENARIO}] idle CPU over {window:g} s, {' and '.join(map(str, COUNTS))} GPUs, "
          "watches off / every 30 s / every second, side by side")  # fmt: skip
    library = build_library(workdir / "lib")
    for count in COUNTS:
        with Simulator() as sim:
            for gpu in gpus(count):
                sim.add("nvidia-h100", gpu.bus_id, gpu.minor)
            nvml = FakeNvml(workdir / f"nvml-{count}", library, gpus(count))
            runs = idle_cpu(workdir, sim, nvml, count, window)
            reads = per_read(nvml, count, window)
        _rows(results, count, runs, reads)
    results.note(
        "scenario 15: CPU of the daemon and its NVML worker (psutil, user + system), idle, no "
        "subscriber, three daemons side by side; the floor (--health-interval 0) is mostly the "
        "stand-in NVML polling its files every 5 ms in each GPU's event wait, which real NVML "
        "does not do"
    )


def _rows(results: Results, count: int, runs: dict[str, Idle], reads: PerRead) -> None:
    off, default, every = runs["off"], runs["default"], runs["1s"]
    results.add(
        Row(SCENARIO, f"{count} GPUs: idle CPU, daemon + NVML worker, watches off (the floor)",
            f"{off.percent:.2f} % of a core (daemon {100 * off.daemon_s / off.seconds:.3f} %)",
            data=vars(off) | {"percent": off.percent}),
    )  # fmt: skip
    results.add(
        Row(SCENARIO, f"{count} GPUs: the same, default --health-interval (30 s)",
            f"{default.percent:.2f} % (daemon {100 * default.daemon_s / default.seconds:.3f} "
            f"%), x{default.percent / off.percent:.3f} the floor",
            data=vars(default) | {"percent": default.percent,
                                  "ratio": default.percent / off.percent}),
    )  # fmt: skip
    added_s = (every.daemon_s + every.worker_s) / every.seconds
    added_s -= (off.daemon_s + off.worker_s) / off.seconds
    per_read_s = added_s / count  # every GPU is read once a second
    results.add(
        Row(SCENARIO, f"{count} GPUs: every second (--health-interval 1), against the floor",
            f"{every.percent:.2f} %, x{every.percent / off.percent:.3f} the floor: "
            f"{per_read_s * 1e6:.0f} us of CPU per GPU per read (within the floor's spread)",
            data=vars(every) | {"percent": every.percent, "per_read_s": per_read_s}),
    )  # fmt: skip
    direct, watched = reads.direct_s, reads.watched_s
    results.add(
        Row(SCENARIO, f"{count} GPUs: one health read in a process of its own: called directly "
            "/ through the worker's watch loop (timer, thread hop, slow-call watcher)",
            f"{direct * 1e6:.0f} / {watched * 1e6:.0f} us of CPU (x{watched / direct:.1f})",
            data={"direct_s": direct, "watched_s": watched}),
    )  # fmt: skip
    sweep = 100 * watched * count / DEFAULT_INTERVAL
    results.add(
        Row(SCENARIO, f"{count} GPUs: the sweep at the default 30 s (watch loop's cost per "
            "read x GPUs / 30 s)", f"{sweep:.4f} % of a core ({sweep / off.percent:.4f} of the "
            f"stand-in's floor; from the daemon's figure: {100 * per_read_s * count / 30:.4f} %)",
            f"<= {TARGET_PERCENT:g} % of a core", "met" if sweep <= TARGET_PERCENT else "MISSED",
            {"percent": sweep, "ratio": sweep / off.percent}),
    )  # fmt: skip


def main(count: int, window: float) -> None:
    """``python -m tests.bench.health_sweep COUNT WINDOW`` with the stand-in's environment:
    prints the CPU seconds of one health read called directly, then through the NVML worker's
    watch loop (``NvmlSource._watch_health``, every second, each GPU in a task of its own)."""
    import pynvml

    from monitor.sources.nvml_worker import health

    pynvml.nvmlInit()
    handles = {g.bus_id: pynvml.nvmlDeviceGetHandleByPciBusId(g.bus_id) for g in gpus(count)}
    readers = [health.HealthReader(handle) for handle in handles.values()]
    for reader in readers:  # the first read finds what the GPU does not support
        reader.read()
    started = time.process_time()
    for _ in range(DIRECT_ROUNDS):
        for reader in readers:
            reader.read()
    direct = (time.process_time() - started) / (DIRECT_ROUNDS * count)
    print(direct, trio.run(_watched, handles, window))


async def _watched(handles: dict[str, object], window: float) -> float:
    from monitor.sources.nvml_worker import health, tasks

    reads = [0]
    plain = health.HealthReader.read

    def counted(reader: health.HealthReader) -> health.Conditions:
        reads[0] += 1
        return plain(reader)

    health.HealthReader.read = counted  # type: ignore[method-assign,assignment]
    send, _receive = trio.open_memory_channel[object](math.inf)
    source = tasks.NvmlSource(
        send,
        deadline=5.0, limiter=trio.CapacityLimiter(64), health_interval=1.0,
    )  # fmt: skip
    async with trio.open_nursery() as nursery:
        source.nursery = nursery
        for address, handle in handles.items():
            nursery.start_soon(source._watch_health, address, handle, trio.CancelScope())
        await trio.sleep(1.5)  # past each GPU's first read
        before, started = reads[0], time.process_time()
        await trio.sleep(window)
        used, done = time.process_time() - started, reads[0] - before
        nursery.cancel_scope.cancel()
    return used / done


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]))

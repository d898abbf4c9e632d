"""Scenario 8, telemetry: what a ``stats`` subscription costs the daemon and its NVML worker
(8 simulated NVIDIA GPUs on the NVML stand-in), against the same daemon idle in the same run,
and 100 ``stats`` subscribers at once."""

from __future__ import annotations

import threading
import time
from dataclasses import asdict
from pathlib import Path

from monitor.sim.nvml import FakeGpu, FakeNvml, build_library
from monitor.sim.umockdev import Simulator
from monitor.wire.blocking import Client
from monitor.wire.errors import DaemonUnavailable
from tests.bench.common import Daemon, Results, Row, Stats

EIGHT_NVIDIA = [f"0000:{i + 1:02x}:00.0" for i in range(8)]


def _gpus() -> list[FakeGpu]:
    return [
        FakeGpu(bus_id=address, uuid=f"GPU-{i:08x}-0000-0000-0000-000000000000", minor=i,
                util_gpu=10 * i, power_mw=100_000 + i)
        for i, address in enumerate(EIGHT_NVIDIA)
    ]  # fmt: skip


def _cpu_over(daemon: Daemon, seconds: float) -> float:
    """Percent of a core the daemon and its NVML worker used over ``seconds``."""
    before, started = daemon.cpu_seconds_with_children(), time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    return 100 * (daemon.cpu_seconds_with_children() - before) / elapsed


class StatsReader:
    """A connection subscribed to ``stats``, read by a thread; how late each sample arrived."""

    def __init__(self, socket: Path, interval: float) -> None:
        self.client = Client(socket, timeout=30)
        started = time.time()
        first = self.client.call("stats", {"interval": interval})
        self.answer_ms = 1000 * (time.time() - started)
        self.devices = len(first["devices"])
        self.lag_ms: list[float] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for params in self.client.notifications("stats"):
                self.lag_ms.append(1000 * (time.time() - params["time"]))
        except (OSError, DaemonUnavailable):
            pass  # closed

    def close(self) -> None:
        self.client.close()
        self.thread.join(timeout=5)


def telemetry(results: Results, workdir: Path, seconds: float) -> None:
    scenario = "8 telemetry"
    print(f"[{scenario}] 8 simulated NVIDIA GPUs on the NVML stand-in; windows of {seconds:g} s")
    nvml = FakeNvml(workdir / "nvml", build_library(workdir / "lib"), _gpus())
    with Simulator() as sim:
        for address in EIGHT_NVIDIA:
            sim.add("nvidia-h100", address, 0)
        env = {**sim.daemon_env(), **nvml.env()}
        args = ["--udev-source", "udev"]
        with Daemon(workdir / "d", args, env=env, nvml=True, log_level="warning") as daemon:
            time.sleep(2.0)  # past start-up and NVML's first reads
            idle, busy = [], []
            for _ in range(2):  # interleaved: idle, subscribed, idle, subscribed
                idle.append(_cpu_over(daemon, seconds))
                reader = StatsReader(daemon.socket, 1)
                busy.append(_cpu_over(daemon, seconds))
                reader.close()
                if reader.devices != 8:
                    raise RuntimeError(f"a sample had {reader.devices} GPUs, not 8")
            idle_mean, busy_mean = sum(idle) / len(idle), sum(busy) / len(busy)
            results.add(
                Row(scenario, "daemon + NVML worker CPU, idle (stand-in library polling inside "
                    "each event wait); with one stats subscriber at 1 s, 8 GPUs",
                    f"{idle_mean:.2f} %; {busy_mean:.2f} % of a core: a sample of 8 GPUs costs "
                    f"{10 * (busy_mean - idle_mean):.1f} ms of CPU",
                    data={"idle_percent": idle, "stats_percent": busy}),
            )  # fmt: skip

            baseline = _cpu_over(daemon, seconds)
            readers = [StatsReader(daemon.socket, 1) for _ in range(100)]
            try:
                answers = Stats.of_ns([int(r.answer_ms * 1e6) for r in readers])
                hundred = _cpu_over(daemon, seconds)
            finally:
                for reader in readers:
                    reader.close()
            lag = Stats.of_ns([int(ms * 1e6) for r in readers for ms in r.lag_ms])
            delivered = sum(len(r.lag_ms) for r in readers)
            with Client(daemon.socket) as client:
                status = client.call("status")
            results.add(
                Row(scenario, "100 stats subscribers at 1 s: answer to stats (all connecting at "
                    "once); sample time -> read by the subscriber",
                    f"{answers.text()}; {lag.text()} ({delivered} notifications)",
                    data={"answer": asdict(answers), "lag": asdict(lag)}),
            )  # fmt: skip
            results.add(
                Row(scenario, "daemon + worker CPU, idle; 100 stats subscribers at 1 s",
                    f"{baseline:.2f} %; {hundred:.2f} % of a core "
                    f"(subscribers left at the end: {status['stats_subscribers']})",
                    data={"idle_percent": baseline, "hundred_percent": hundred}),
            )  # fmt: skip
    results.note(
        "scenario 8: CPU is the daemon's and its NVML worker's user+system time (psutil) over "
        "each window, measured in alternating windows; the stand-in library polls its scenario "
        "files every 5 ms inside each event wait, which is the idle figure here, not real NVML's"
    )

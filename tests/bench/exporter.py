"""Scenario 11, the Prometheus exporter: 64 simulated NVIDIA GPUs (umockdev and the NVML
stand-in) behind one daemon and ``hotplug-monitor exporter``.

- a scrape of /metrics (all 64 GPUs with their telemetry), one keep-alive connection, request
  sent to the whole body read: p50 / p99 / max;
- the exporter's CPU and RSS while nobody scrapes it (it still receives a sample every second);
- the daemon's CPU (with its NVML worker) in alternating windows: exporter running and scraped
  every second, against the same exporter not scraped: a scrape reads what the exporter holds
  and never reaches the daemon, so the difference should be noise.
"""

from __future__ import annotations

import http.client
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from monitor.sim.nvml import FakeGpu, FakeNvml, build_library
from monitor.sim.umockdev import Simulator
from tests.bench.common import REPO, Daemon, Results, Row, Stats, stop_process

SCENARIO = "11 Prometheus exporter"
GPUS = [f"0000:{i // 8 + 1:02x}:{i % 8:02x}.0" for i in range(64)]


def _gpus() -> list[FakeGpu]:
    return [
        FakeGpu(bus_id=address, uuid=f"GPU-{i:08x}-0000-0000-0000-000000000000", minor=i,
                util_gpu=i % 100, temperature_c=30 + i % 50, power_mw=100_000 + i)
        for i, address in enumerate(GPUS)
    ]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _cpu_percent(processes: list[psutil.Process], seconds: float) -> float:
    """Percent of a core the processes and their children used over ``seconds``."""
    return sum(_cpu_percents(processes, seconds))


def _cpu_percents(processes: list[psutil.Process], seconds: float) -> tuple[float, float]:
    """Percent of a core the processes used over ``seconds``, and their children."""

    def total() -> tuple[float, float]:
        used = [0.0, 0.0]
        for process in processes:
            for each in (process, *process.children(recursive=True)):
                try:
                    times = each.cpu_times()
                except psutil.NoSuchProcess:
                    continue
                used[each is not process] += times.user + times.system
        return used[0], used[1]

    before, started = total(), time.monotonic()
    time.sleep(seconds)
    after, elapsed = total(), time.monotonic() - started
    return 100 * (after[0] - before[0]) / elapsed, 100 * (after[1] - before[1]) / elapsed


class Scraper:
    """Scrapes /metrics every ``interval`` seconds from a thread, as Prometheus would."""

    def __init__(self, port: int, interval: float) -> None:
        self.port, self.interval = port, interval
        self.scrapes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self._stop.wait(self.interval):
            connection.request("GET", "/metrics")
            connection.getresponse().read()
            self.scrapes += 1
        connection.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def exporter(results: Results, workdir: Path, scrapes: int, window: float) -> None:
    print(f"[{SCENARIO}] 64 simulated GPUs; {scrapes} scrapes; CPU windows of {window:g} s")
    nvml = FakeNvml(workdir / "nvml", build_library(workdir / "lib"), _gpus())
    with Simulator() as sim:
        for address in GPUS:
            sim.add("nvidia-h100", address, 0)
        env = {**sim.daemon_env(), **nvml.env()}
        with Daemon(workdir / "d", ["--udev-source", "udev"], env=env, nvml=True,
                    log_level="warning") as daemon:  # fmt: skip
            port = _free_port()
            log = (workdir / "exporter.log").open("wb")
            process = subprocess.Popen(
                [sys.executable, "-m", "monitor", "exporter", "--socket", str(daemon.socket),
                 "--listen", f"127.0.0.1:{port}"],
                stderr=log, cwd=REPO,
            )  # fmt: skip
            try:
                _measure(results, daemon, process, port, scrapes, window)
            finally:
                stop_process(process)
                log.close()
    results.note(
        "scenario 11: CPU is user+system time (psutil) over each window, the daemon's with its "
        "NVML worker; the exporter holds a stats subscription at 1 s in every window, so the "
        "daemon's sampling of 64 GPUs is in both the scraped and the unscraped figure"
    )


def _measure(
    results: Results,
    daemon: Daemon,
    process: subprocess.Popen[bytes],
    port: int,
    scrapes: int,
    window: float,
) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    deadline = time.monotonic() + 120
    body = b""
    while body.count(b"hotplug_monitor_device_temperature_celsius{") < len(GPUS):
        if time.monotonic() > deadline or process.poll() is not None:
            raise RuntimeError(f"the exporter never showed 64 GPUs' telemetry: {body[:500]!r}")
        time.sleep(0.2)
        try:
            connection.request("GET", "/metrics")
            body = connection.getresponse().read()
        except OSError:
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    samples: list[int] = []
    for i in range(scrapes + 20):  # the first 20 warm up, unrecorded
        began = time.perf_counter_ns()
        connection.request("GET", "/metrics")
        body = connection.getresponse().read()
        if i >= 20:
            samples.append(time.perf_counter_ns() - began)
    connection.close()
    series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    results.latency(
        SCENARIO,
        f"scrape of /metrics, 64 GPUs ({len(body) // 1024} KiB, {series} series), keep-alive",
        Stats.of_ns(samples),
        target_p99_ms=100,  # a tenth of the shortest scrape interval
        quick=scrapes < 1000,
        bytes=len(body),
        series=series,
    )
    exporter = psutil.Process(process.pid)
    time.sleep(2)
    idle_cpu = _cpu_percent([exporter], window)
    rss = exporter.memory_info().rss
    results.add(
        Row(SCENARIO, "exporter, not scraped (a stats sample of 64 GPUs each second): CPU, RSS",
            f"{idle_cpu:.2f} % of a core, {rss / 2**20:.1f} MiB",
            data={"cpu_percent": idle_cpu, "rss_bytes": rss}),
    )  # fmt: skip
    daemon_process = psutil.Process(daemon.pid)
    quiet: list[tuple[float, float]] = []
    scraped: list[tuple[float, float]] = []
    exporter_scraped = []
    for _ in range(2):  # interleaved: not scraped, scraped, not scraped, scraped
        quiet.append(_cpu_percents([daemon_process], window))
        scraper = Scraper(port, 1.0)
        before = exporter.cpu_times()
        scraped.append(_cpu_percents([daemon_process], window))
        after = exporter.cpu_times()
        scraper.stop()
        used = after.user + after.system - before.user - before.system
        exporter_scraped.append(100 * used / window)
    for index, who, target in ((0, "daemon", 1.0), (1, "its NVML worker", None)):
        quiet_mean = sum(q[index] for q in quiet) / 2
        scraped_mean = sum(s[index] for s in scraped) / 2
        difference = scraped_mean - quiet_mean
        results.add(
            Row(SCENARIO, f"{who} CPU: exporter not scraped; scraped every second",
                f"{quiet_mean:.2f} %; {scraped_mean:.2f} % of a core (difference "
                f"{difference:+.2f} points)",
                "" if target is None else f"difference <= {target:g} point",
                "info" if target is None else "met" if difference <= target else "MISSED",
                data={"quiet_percent": [q[index] for q in quiet],
                      "scraped_percent": [s[index] for s in scraped]}),
        )  # fmt: skip
    results.add(
        Row(SCENARIO, "exporter CPU, scraped every second",
            f"{sum(exporter_scraped) / 2:.2f} % of a core",
            data={"cpu_percent": exporter_scraped}),
    )  # fmt: skip

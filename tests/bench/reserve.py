"""Scenario 5: reserve + release pairs per second, over 1 connection and over several at once.

Each connection has one request in flight at a time (no pipelining): reserve its own device
(leases are exclusive: one connection per device, up to 16), read the answer, release that
reservation by its ID, read the answer. A pair's latency runs from sending the reserve to
reading the release's answer. Durable leases are on disk (fsync) before they are answered;
connection-bound ones (``"bind": "connection"``) are not written.
"""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.bench.common import (
    REPO,
    Daemon,
    Results,
    Row,
    Stats,
    now_ns,
    stop_process,
    worktree,
)
from tests.bench.profile import PySpy


def _reserve(request_id: int, device: str, bind: bool) -> bytes:
    params: dict[str, Any] = {"device_ids": [device]}
    if bind:
        params["bind"] = "connection"
    return (
        json.dumps(
            {"jsonrpc": "2.0", "id": request_id, "method": "reserve", "params": params}
        ).encode()
        + b"\n"
    )


def _release(request_id: int, reservation: str) -> bytes:
    params = {"reservation_id": reservation}
    return (
        json.dumps(
            {"jsonrpc": "2.0", "id": request_id, "method": "release", "params": params}
        ).encode()
        + b"\n"
    )


class _Conn:
    def __init__(self, path: Path, device: str, bind: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.setblocking(False)
        self.device = device
        self.bind = bind
        self.buffer = b""
        self.next_id = 1
        self.started = 0
        self.releasing = False
        self.pairs = 0

    def send_reserve(self) -> None:
        self.started = now_ns()
        self.releasing = False
        self.sock.sendall(_reserve(self.next_id, self.device, self.bind))
        self.next_id += 1

    def on_line(self, line: bytes) -> int | None:
        """Handle one answer; the pair's latency in ns when it completes one."""
        message = json.loads(line)
        if "result" not in message:
            raise RuntimeError(f"refused: {message}")
        if not self.releasing:
            self.releasing = True
            self.sock.sendall(_release(self.next_id, message["result"]["reservation_id"]))
            self.next_id += 1
            return None
        if not message["result"]["released"]:
            raise RuntimeError(f"nothing released: {message}")
        self.pairs += 1
        return now_ns() - self.started


def run_pairs(
    path: Path, devices: list[str], connections: int, pairs: int, bind: bool = False
) -> tuple[list[int], float]:
    """Drive ``pairs`` reserve+release pairs spread over ``connections``, one device each;
    latencies and seconds."""
    conns = [_Conn(path, devices[i], bind) for i in range(connections)]
    by_fd = {c.sock.fileno(): c for c in conns}
    poller = select.epoll()
    latencies: list[int] = []
    try:
        for conn in conns:
            poller.register(conn.sock.fileno(), select.EPOLLIN)
        started = time.perf_counter()
        in_flight = 0
        for conn in conns:
            if len(latencies) + in_flight < pairs:
                conn.send_reserve()
                in_flight += 1
        while in_flight:
            for fd, _ in poller.poll(10.0):
                conn = by_fd[fd]
                data = conn.sock.recv(1 << 16)
                if not data:
                    raise RuntimeError("the daemon closed a connection")
                conn.buffer += data
                while b"\n" in conn.buffer:
                    line, conn.buffer = conn.buffer.split(b"\n", 1)
                    latency = conn.on_line(line)
                    if latency is None:
                        continue
                    latencies.append(latency)
                    in_flight -= 1
                    if len(latencies) + in_flight < pairs:
                        conn.send_reserve()
                        in_flight += 1
        elapsed = time.perf_counter() - started
    finally:
        poller.close()
        for conn in conns:
            conn.sock.close()
    return latencies, elapsed


class FloorServer:
    """``tests.bench.floor`` in a subprocess, with its socket and file in ``workdir``."""

    def __init__(self, workdir: Path, disk: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.socket = workdir / f"floor-{disk}.sock"
        command = [sys.executable, "-m", "tests.bench.floor", str(self.socket), "--disk", disk,
                   "--file", str(workdir / f"floor-{disk}.log")]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, cwd=REPO)
        assert self.process.stdout is not None
        if self.process.stdout.readline() != b"ready\n":
            raise RuntimeError(f"the {disk} floor server did not start")

    def __enter__(self) -> FloorServer:
        return self

    def __exit__(self, *exc: object) -> None:
        stop_process(self.process)
        if self.process.stdout is not None:
            self.process.stdout.close()


FLOORS = {
    "none": "bare trio JSON-RPC server, no disk",
    "thread": "the same, one append + fdatasync per request in a worker thread",
    "inline": "the same, one append + fdatasync per request on the event loop",
}


def floors(
    results: Results, workdir: Path, connections: tuple[int, ...], pairs: int
) -> dict[tuple[str, int], float]:
    """Pairs per second of each floor server over each number of connections."""
    scenario = "5 reservations"
    rates = {}
    devices = [f"floor-{i}" for i in range(max(connections))]
    for disk, label in FLOORS.items():
        with FloorServer(workdir, disk) as floor:
            run_pairs(floor.socket, devices, 1, 200)  # warm-up
            for count in connections:
                latencies, elapsed = run_pairs(floor.socket, devices, count, pairs)
                rate = rates[disk, count] = len(latencies) / elapsed
                results.add(
                    Row(scenario, f"floor: {label}: pairs/s over {count} connection(s)",
                        f"{rate:,.0f} pairs/s ({2 * rate:,.0f} requests/s)",
                        data={"rate": rate, "disk": disk, "connections": count}),
                )  # fmt: skip
    return rates


def against_floor(
    results: Results, metric: str, rate: float, floor: float, target: float | None
) -> None:
    ratio = rate / floor
    goal, verdict = "", "info"
    if target is not None:
        goal, verdict = f">= x{target:.2f}", "met" if ratio >= target else "MISSED"
    results.add(Row("5 reservations", metric, f"x{ratio:.2f}", goal, verdict, {"ratio": ratio}))


def reservations(
    results: Results,
    daemon: Daemon,
    devices: list[str],
    pairs: int,
    quick: bool,
    label: str,
    profiles: dict[str, Any] | None = None,
    bind: bool = False,
) -> dict[int, float]:
    scenario = "5 reservations"
    rates: dict[int, float] = {}
    run_pairs(daemon.socket, devices, 1, 200, bind)  # warm-up
    many = min(16, len(devices))
    for connections in (1, many):
        print(f"[{scenario}] {label}: {pairs:,} pairs over {connections} connection(s)")
        cpu_before = daemon.cpu_seconds()
        latencies, elapsed = run_pairs(daemon.socket, devices, connections, pairs, bind)
        busy = (daemon.cpu_seconds() - cpu_before) / elapsed
        rate = len(latencies) / elapsed
        rates[connections] = rate
        results.add(
            Row(scenario, f"{label}: pairs/s over {connections} connection(s)",
                f"{rate:,.0f} pairs/s (daemon busy {busy:.0%} of a core, "
                f"{busy / rate * 1e6:.0f} us CPU per pair)",
                data={"pairs": len(latencies), "seconds": elapsed, "rate": rate,
                      "daemon_busy": busy}),
        )  # fmt: skip
        results.latency(
            scenario, f"{label}: pair latency over {connections} connection(s)",
            Stats.of_ns(latencies), quick=quick, connections=connections,
        )  # fmt: skip
    results.add(
        Row(scenario, f"{label}: ratio pairs/s {many} connections / 1",
            f"x{rates[many] / rates[1]:.2f}", data={"ratio": rates[many] / rates[1]}),
    )  # fmt: skip
    if profiles is not None:
        for connections in (1, many):
            output = daemon.socket.with_suffix(f".{connections}.pyspy")
            with PySpy(daemon.pid, output) as spy:
                run_pairs(daemon.socket, devices, connections, pairs, bind)
            profiles[f"reserve+release, {label}, {connections} connection(s)"] = spy.summary()
    return rates


def pairs_against(
    results: Results,
    workdir: Path,
    env: dict[str, str],
    devices: list[str],
    pairs: int,
    revision: str,
    rounds: int,
) -> None:
    """Connection-bound reserve+release pairs over one connection, this tree's daemon against
    ``revision``'s, alternating over ``rounds`` daemons (False, True, True, False, ...) so that
    drift in the machine's load falls on both alike. The noise is the paired rounds' spread."""
    scenario = "5 reservations"
    rates: dict[bool, list[float]] = {False: [], True: []}
    with worktree(revision) as other:
        for round_ in range(rounds):
            old = round_ % 4 in (1, 2)
            args = ["--udev-source", "udev"]
            with Daemon(workdir / f"round-{round_}", args, env=env, log_level="warning",
                        repo=other if old else REPO) as daemon:  # fmt: skip
                run_pairs(daemon.socket, devices, 1, 200, bind=True)  # warm-up
                latencies, elapsed = run_pairs(daemon.socket, devices, 1, pairs // rounds, True)
                rates[old].append(len(latencies) / elapsed)
    ratios = sorted(new / old for new, old in zip(rates[False], rates[True], strict=True))
    overall = sum(rates[False]) / sum(rates[True])
    results.add(
        Row(scenario, f"ratio connection-bound pairs/s, 1 connection, this tree / {revision}",
            f"x{overall:.2f} ({len(ratios)} paired rounds: x{ratios[0]:.2f} to x{ratios[-1]:.2f})",
            "not slower in every pair", "MISSED" if ratios[-1] < 1.0 else "met",
            {"ratio": overall, "pairs": ratios}),
    )  # fmt: skip

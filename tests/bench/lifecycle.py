"""Scenario 9: how soon things end. A lease after its holder process is killed, and after its
connection closes, each timed to the patch that a subscriber reads; and SIGTERM to exit with
1,000 subscribers connected. The tests check that each happens; these say how fast."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from monitor.wire.blocking import Client
from monitor.wire.mirror import Mirror
from tests.bench.common import Daemon, Results, Row, Stats, now_ns, raise_fd_limit, read_line

SUBSCRIBERS = 1000


def _reserved(mirror: Mirror, device: str) -> bool:
    return mirror.devices()[device][1].get("reserved_by") is not None


def _until(watcher: Client, mirror: Mirror, done: Callable[[Mirror], bool]) -> None:
    for params in watcher.notifications():
        mirror.apply(params)
        if done(mirror):
            return


def lease_ends(
    results: Results, workdir: Path, env: dict[str, str], device: str, samples: int, quick: bool
) -> None:
    holder_ns, connection_ns = [], []
    with (
        Daemon(workdir, ["--udev-source", "udev"], env=env, log_level="warning") as daemon,
        Client(daemon.socket, timeout=30) as watcher,
        Client(daemon.socket, timeout=30) as client,
    ):
        mirror = Mirror(watcher.call("subscribe"))
        for _ in range(samples):
            holder = subprocess.Popen(["sleep", "600"])
            client.call("reserve", {"device_ids": [device], "holder_pid": holder.pid})
            _until(watcher, mirror, lambda m: _reserved(m, device))
            killed = now_ns()
            holder.kill()
            _until(watcher, mirror, lambda m: not _reserved(m, device))
            holder_ns.append(now_ns() - killed)
            holder.wait()
        for _ in range(samples):
            with Client(daemon.socket, timeout=30) as bound:
                bound.call("reserve", {"device_ids": [device], "bind": "connection"})
                _until(watcher, mirror, lambda m: _reserved(m, device))
                closed = now_ns()
            _until(watcher, mirror, lambda m: not _reserved(m, device))
            connection_ns.append(now_ns() - closed)
    scenario = "9 how soon things end"
    for metric, got in (
        ("holder process killed -> lease gone in a subscriber's snapshot", holder_ns),
        ("lease's connection closed -> lease gone in a subscriber's snapshot", connection_ns),
    ):
        results.latency(scenario, metric, Stats.of_ns(got), target_p99_ms=1000, quick=quick)


def shutdown(
    results: Results, workdir: Path, env: dict[str, str], repeats: int, target_ms: float = 2000
) -> None:
    """SIGTERM to exit with 1,000 subscribers connected, each of which sees end of stream."""
    raise_fd_limit()
    took_ns = []
    for run in range(repeats):
        daemon = Daemon(workdir / str(run), ["--udev-source", "udev"], env=env, log_level="warning")
        subscribers = []
        try:
            for _ in range(SUBSCRIBERS):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(str(daemon.socket))
                sock.sendall(b'{"jsonrpc":"2.0","id":1,"method":"subscribe"}\n')
                subscribers.append(sock)
            for sock in subscribers:
                read_line(sock)
            time.sleep(0.5)  # settled: nothing is in flight
            asked = now_ns()
            daemon.process.terminate()
            code = daemon.process.wait(timeout=60)
            took_ns.append(now_ns() - asked)
            if code != 0:
                raise RuntimeError(f"exit status {code}:\n{daemon.log()}")
            if any(sock.recv(1) != b"" for sock in subscribers):
                raise RuntimeError("a subscriber did not see end of stream")
        finally:
            for sock in subscribers:
                with contextlib.suppress(OSError):
                    sock.close()
            daemon.stop()
    stats = Stats.of_ns(took_ns)
    results.add(
        Row(
            "9 how soon things end",
            f"SIGTERM -> exit, {SUBSCRIBERS:,} subscribers connected (p50 / max of {repeats})",
            f"{stats.p50_ms:.0f} / {stats.max_ms:.0f} ms",
            f"max <= {target_ms:g} ms",
            "met" if stats.max_ms <= target_ms else "MISSED",
            {"p50_ms": stats.p50_ms, "max_ms": stats.max_ms, "n": stats.n},
        )
    )

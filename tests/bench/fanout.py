"""Scenario 4: fan-out. N subscribers on non-blocking sockets in this process (one epoll loop),
one real kernel uevent that changes the snapshot, and the time until each subscriber has read
its patch. Then the same with one subscriber that has stopped reading (its socket full)."""

from __future__ import annotations

import array
import fcntl
import json
import select
import socket
import termios
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tests.bench.common import (
    Daemon,
    Results,
    Row,
    Stats,
    emit,
    now_ns,
    raise_fd_limit,
    read_line,
    uevent_file,
)
from tests.bench.profile import PySpy

SUBSCRIBE = b'{"jsonrpc":"2.0","id":1,"method":"subscribe"}\n'
CONNECT_CHUNK = 500  # below the daemon's listen backlog, so connect() never waits long


class Subscribers:
    """Subscribed connections read by one epoll loop; ``round`` stamps each one's next line."""

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.socks: dict[int, socket.socket] = {}
        self.pending: dict[int, bytes] = {}

    def connect(self, path: Path, count: int) -> None:
        for start in range(0, count, CONNECT_CHUNK):
            chunk = []
            for _ in range(min(CONNECT_CHUNK, count - start)):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(str(path))
                sock.sendall(SUBSCRIBE)
                chunk.append(sock)
            for sock in chunk:  # each answer is the snapshot: one line
                sock.settimeout(30)
                data = read_line(sock)
                if b'"result"' not in data:
                    raise RuntimeError(f"subscribe refused: {data[:200]!r}")
                sock.setblocking(False)
                self.socks[sock.fileno()] = sock
                self.pending[sock.fileno()] = b""
                self.epoll.register(sock.fileno(), select.EPOLLIN)

    def round(self, trigger: Any, expected_generation: int, timeout: float = 30.0) -> list[int]:
        """Fire ``trigger``; return, per subscriber, ns from the trigger until it read its
        notification (a whole line) for ``expected_generation``."""
        waiting = set(self.socks)
        latencies: list[int] = []
        start = now_ns()
        trigger()
        deadline = time.monotonic() + timeout
        while waiting:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(waiting)} subscribers did not get the change")
            for fd, _ in self.epoll.poll(1.0):
                data = self.socks[fd].recv(1 << 16)
                stamp = now_ns()
                if not data:
                    raise RuntimeError("daemon closed a subscriber")
                buffered = self.pending[fd] + data
                if fd in waiting and b"\n" in buffered:
                    latencies.append(stamp - start)
                    waiting.discard(fd)
                self.pending[fd] = buffered
        # Checked after the clock stopped: every subscriber got exactly that patch.
        for fd, buffered in self.pending.items():
            lines = buffered.split(b"\n")
            if len(lines) != 2 or lines[1]:
                raise RuntimeError(f"subscriber {fd} got {buffered[:300]!r}")
            params = json.loads(lines[0])["params"]
            if params.get("generation") != expected_generation or "patch" not in params:
                raise RuntimeError(f"subscriber {fd} got {params}")
            self.pending[fd] = b""
        return latencies

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close()
        self.epoll.close()


class Flapper:
    """Alternating synthetic remove and add of one real device: each is one visible change."""

    def __init__(self, fd: int, generation: int) -> None:
        self.fd = fd
        self.generation = generation
        self.present = True

    def round(self, subscribers: Subscribers) -> list[int]:
        action = "remove" if self.present else "add"
        self.present = not self.present
        self.generation += 1
        return subscribers.round(lambda: emit(self.fd, action), self.generation)


def unread_bytes(sock: socket.socket) -> int:
    buffer = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, buffer)
    return buffer[0]


def stall(daemon: Daemon, flapper: Flapper, probe: Subscribers) -> tuple[socket.socket, int, int]:
    """A subscriber that reads its snapshot and then nothing more, fed paced patches until its
    socket stops taking them (the daemon's writer for it is then blocked and its buffer full)."""
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stalled.connect(str(daemon.socket))
    stalled.sendall(SUBSCRIBE)
    last, patches = -1, 0
    while patches < 5000:
        for _ in range(100):
            flapper.round(probe)
            patches += 1
        queued = unread_bytes(stalled)
        if queued == last:
            return stalled, queued, patches
        last = queued
    raise RuntimeError("the stalled subscriber's socket never filled")


def fanout(
    results: Results,
    workdir: Path,
    address: str,
    pci_class: str,
    counts: list[int],
    rounds: int,
    quick: bool,
    profiles: dict[str, Any] | None = None,
) -> None:
    scenario = "4 fan-out"
    limit = raise_fd_limit()
    counts = [c for c in counts if c + 64 <= limit]
    args = ["--udev-source", "kernel", "--match-class", pci_class, "--max-clients", str(limit)]
    daemon = Daemon(workdir, args, log_level="warning")
    subscribers = Subscribers()
    probe = Subscribers()
    stalled: socket.socket | None = None
    try:
        with uevent_file(address) as fd:
            flapper = Flapper(fd, daemon.fingerprint()["generation"])

            def measure(rounds: int) -> Stats:
                samples: list[int] = []
                for _ in range(rounds):
                    samples += flapper.round(subscribers)
                    time.sleep(0.1)
                return Stats.of_ns(samples)

            print(f"[{scenario}] stalling one subscriber")
            probe.connect(daemon.socket, 1)
            stalled, queued, patches = stall(daemon, flapper, probe)
            probe.close()
            results.add(
                Row(scenario, "stalled subscriber", f"stopped reading; {queued:,} bytes unread "
                    f"in its socket after {patches} patches", data={"unread_bytes": queued}),
            )  # fmt: skip
            first = counts[0]
            idle = daemon.rss_bytes()
            print(f"[{scenario}] {first:,} subscribers")
            subscribers.connect(daemon.socket, first)
            measure(2)  # warm-up, unrecorded
            with_stall = measure(rounds)
            stalled.close()
            stalled = None
            time.sleep(0.2)
            without = measure(rounds)
            results.latency(
                scenario, f"{first:,} subscribers, one change: each has it",
                without, target_p99_ms=50.0, quick=quick, subscribers=first, rounds=rounds,
            )  # fmt: skip
            results.latency(
                scenario, f"{first:,} subscribers + 1 stalled (not reading): each other has it",
                with_stall, target_p99_ms=50.0, quick=quick, subscribers=first, rounds=rounds,
            )  # fmt: skip
            results.ratio(scenario, "ratio with stalled / without", with_stall, without)
            if profiles is not None:
                with PySpy(daemon.pid, workdir / f"fanout-{first}.pyspy") as spy:
                    measure(rounds)
                profiles[f"fan-out to {first:,} subscribers"] = spy.summary()
            subscribers.close()
            results.memory_after(scenario, f"{first:,} subscribers left", idle, daemon)
            subscribers = Subscribers()
            for count in counts[1:]:
                print(f"[{scenario}] {count:,} subscribers")
                subscribers.connect(daemon.socket, count - len(subscribers.socks))
                results.latency(
                    scenario, f"{count:,} subscribers, one change: each has it",
                    measure(rounds), quick=quick, subscribers=count, rounds=rounds,
                )  # fmt: skip
                if profiles is not None:
                    with PySpy(daemon.pid, workdir / f"fanout-{count}.pyspy") as spy:
                        measure(rounds)
                    profiles[f"fan-out to {count:,} subscribers"] = spy.summary()
            results.note(
                "scenario 4: every subscriber is a non-blocking socket in the benchmark process, "
                "read by one epoll loop; a subscriber's time is stamped when its read returns, so "
                "the last ones include this loop's own reading of the others; each round is one "
                "real uevent ('remove' or 'add') written to the device's uevent file"
            )
        if not daemon.alive():
            raise RuntimeError(f"the daemon died:\n{daemon.log()}")
    finally:
        if stalled is not None:
            stalled.close()
        subscribers.close()
        probe.close()
        daemon.stop()


def gc_before_after(
    results: Results,
    workdir: Path,
    address: str,
    pci_class: str,
    counts: list[int],
    rounds: int,
    quick: bool,
) -> None:
    """N subscribers on the daemon with Python's default garbage collector settings (before,
    through tests.bench.tuned), then on the daemon as it is (after), one after the other."""
    scenario = "4 fan-out"
    limit = raise_fd_limit()
    args = ["--udev-source", "kernel", "--match-class", pci_class, "--max-clients", str(limit)]
    for count in [c for c in counts if c + 64 <= limit]:
        stats: dict[str, Stats] = {}
        pauses: dict[str, list[float]] = {}
        with uevent_file(address) as fd:
            # Both through the launcher, both logging their collector's pauses.
            for name, tune in (("before (default gc)", "gclog,gc-default"), ("as is", "gclog")):
                print(f"[{scenario}] {count:,} subscribers, daemon {name}")
                folder = workdir / f"{count}-{tune.replace(',', '-')}"
                daemon = Daemon(folder, args, log_level="warning", tune=tune)
                subscribers = Subscribers()
                try:
                    subscribers.connect(daemon.socket, count)
                    flapper = Flapper(fd, daemon.fingerprint()["generation"])
                    logged = len(daemon.log().splitlines())
                    samples: list[int] = []
                    for index in range(rounds + 2):  # the first 2 warm up, unrecorded
                        latencies = flapper.round(subscribers)
                        if index >= 2:
                            samples += latencies
                        time.sleep(0.1)
                    stats[name] = Stats.of_ns(samples)
                    pauses[name] = [
                        float(line.split()[3]) for line in daemon.log().splitlines()[logged:]
                        if line.startswith("gc pause gen2")
                    ]  # fmt: skip
                finally:
                    subscribers.close()
                    daemon.stop()
        before, after = stats["before (default gc)"], stats["as is"]
        target = 50.0 if count == 1000 else None
        results.add(
            Row(scenario,
                f"{count:,} subscribers, before: Python's default gc settings",
                f"{before.text()} (n={before.n})", "", "info", asdict(before)),
        )  # fmt: skip
        results.latency(
            scenario, f"{count:,} subscribers, after: daemon as is (rarer gc, frozen start-up)",
            after, quick=quick, target_p99_ms=target, rounds=rounds,
        )  # fmt: skip
        for name, found in pauses.items():
            longest = max(found, default=0.0)
            results.add(
                Row(scenario, f"{count:,} subscribers: full (gen 2) collections during the "
                    f"rounds, daemon {name}", f"{len(found)}, longest {longest:.0f} ms",
                    data={"pauses_ms": found}),
            )  # fmt: skip
        results.ratio(scenario, f"{count:,} subscribers: ratio after / before", after, before)

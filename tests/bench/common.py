"""What every scenario shares: latency statistics, result rows, the daemon in a subprocess, a
subscriber in another process, and the real PCI device whose uevent file we write."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import platform
import queue
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil

from monitor.wire.blocking import Client
from monitor.wire.errors import DaemonUnavailable

REPO = Path(__file__).resolve().parents[2]
PCI = Path("/sys/bus/pci/devices")
MIN_SAMPLES = 1000  # every latency in a full run is over at least this many samples


@dataclass(frozen=True)
class Stats:
    """p50 / p99 / max of a latency sample, in milliseconds."""

    n: int
    p50_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of_ns(cls, samples_ns: Sequence[int]) -> Stats:
        if not samples_ns:
            raise ValueError("no samples")
        ordered = sorted(samples_ns)

        def rank(q: float) -> float:
            # Nearest-rank percentile: an observed value, never an interpolation.
            index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered) - 1e-9) - 1))
            return ordered[index] / 1e6

        return cls(len(ordered), rank(0.50), rank(0.99), ordered[-1] / 1e6)

    def text(self) -> str:
        return f"{fmt_ms(self.p50_ms)} / {fmt_ms(self.p99_ms)} / {fmt_ms(self.max_ms)} ms"


def stop_process(process: subprocess.Popen[Any]) -> None:
    """SIGTERM, five seconds to exit, then SIGKILL."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def fmt_ms(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if value >= 1 else f"{value:.3f}"


SETTLE_SECONDS = 10.0  # after a burst, before its memory is judged
RSS_SLACK_MIB = 5


@dataclass
class Row:
    """One line of the table. ``verdict`` is "met", "MISSED", "info", "n/a", or "before: ..."
    for a row that measures the former behaviour (not counted against a target)."""

    scenario: str
    metric: str
    value: str
    target: str = ""
    verdict: str = "info"
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(f"  {row.metric}: {row.value}" + (f"  [{row.verdict}]" if row.target else ""))

    def latency(
        self,
        scenario: str,
        metric: str,
        stats: Stats,
        *,
        target_p99_ms: float | None = None,
        quick: bool = False,
        **data: Any,
    ) -> None:
        if not quick and stats.n < MIN_SAMPLES:
            raise AssertionError(f"{metric}: only {stats.n} samples")
        target, verdict = "", "info"
        if target_p99_ms is not None:
            target = f"p99 <= {target_p99_ms:g} ms"
            verdict = "met" if stats.p99_ms <= target_p99_ms else "MISSED"
        value = f"{stats.text()} (n={stats.n})"
        self.add(Row(scenario, metric, value, target, verdict, {**asdict(stats), **data}))

    def ratio(self, scenario: str, metric: str, numerator: Stats, denominator: Stats) -> None:
        p50 = numerator.p50_ms / denominator.p50_ms
        p99 = numerator.p99_ms / denominator.p99_ms
        self.add(
            Row(
                scenario,
                metric,
                f"x{p50:.2f} at p50, x{p99:.2f} at p99",
                data={"p50": p50, "p99": p99},
            )
        )

    def memory_after(self, scenario: str, what: str, idle: int, daemon: Daemon) -> None:
        """RSS ``SETTLE_SECONDS`` after ``what``, against ``idle`` (its RSS before)."""
        time.sleep(SETTLE_SECONDS)
        after = daemon.rss_bytes()
        grown = (after - idle) / 2**20
        self.add(
            Row(scenario, f"RSS {SETTLE_SECONDS:g} s after {what}, against idle before",
                f"{idle / 2**20:.1f} -> {after / 2**20:.1f} MiB ({grown:+.1f})",
                f"<= idle + {RSS_SLACK_MIB} MiB", "met" if grown <= RSS_SLACK_MIB else "MISSED",
                {"idle_bytes": idle, "after_bytes": after}),
        )  # fmt: skip

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}")


def read_line(sock: socket.socket) -> bytes:
    """One whole answer line from a blocking socket."""
    data = b""
    while not data.endswith(b"\n"):
        part = sock.recv(1 << 20)
        if not part:
            raise RuntimeError("the daemon closed the connection")
        data += part
    return data


def now_ns() -> int:
    """CLOCK_MONOTONIC, the clock every process here (and udevadm) stamps events with."""
    return time.monotonic_ns()


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
        "load_average_at_start": list(os.getloadavg()),
    }


@functools.cache
def log_to_stderr(repo: Path = REPO) -> tuple[str, ...]:
    """``--log-target stderr`` where the daemon in ``repo`` has that flag (it may log to the
    journal by default): the storm scenario counts overflows in the daemon's log."""
    usage = subprocess.run(
        [sys.executable, "-m", "monitor", "serve", "--help"],
        capture_output=True, text=True, cwd=repo, check=True,
    ).stdout  # fmt: skip
    return ("--log-target", "stderr") if "--log-target" in usage else ()


def source_version() -> dict[str, Any]:
    """The commit measured, and whether the daemon's code differs from it (read-only git)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO)
        return done.stdout.strip()

    changed = git("status", "--porcelain", "--", "monitor")
    return {"commit": git("rev-parse", "HEAD"), "monitor_uncommitted": changed.splitlines()}


class Daemon:
    """``python -m monitor serve`` in a subprocess; stderr (the log) kept in a file."""

    def __init__(
        self,
        workdir: Path,
        args: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        name: str = "monitor",
        log_level: str = "info",
        wait: bool = True,
        tune: str | None = None,
        cdi: bool = False,
        nvml: bool = False,
        repo: Path = REPO,
    ) -> None:
        """``nvml``: with the NVML source (give ``env`` the stand-in's, FakeNvml.env());
        ``cdi``: keeping a CDI spec in ``workdir/cdi``; ``repo``: the source tree whose daemon
        runs (another commit's worktree, for ``--against``)."""
        workdir.mkdir(parents=True, exist_ok=True)
        self.socket = workdir / f"{name}.sock"
        self.log_path = workdir / f"{name}.log"
        # ``tune``: a fix turned back off by tests.bench.tuned, for before/after rows.
        module = "monitor" if tune is None else "tests.bench.tuned"
        if tune is not None:
            env = {**(os.environ if env is None else env), "HOTPLUG_BENCH_TUNE": tune}
        self.command = [
            sys.executable, "-m", module, "serve", "--socket", str(self.socket),
            "--state-dir", str(workdir / "state"), *([] if nvml else ["--no-nvml"]),
            *(("--cdi-dir", str(workdir / "cdi")) if cdi else ("--no-cdi",)),
            "--log-level", log_level,
            *log_to_stderr(repo), *args,
        ]  # fmt: skip
        self._log = self.log_path.open("wb")
        # As the systemd unit runs it: glibc's allocator, which gives freed pages back.
        env = {**(os.environ if env is None else env), "PYTHONMALLOC": "malloc"}
        self.process = subprocess.Popen(self.command, stderr=self._log, env=env, cwd=repo)
        self.psutil = psutil.Process(self.process.pid)
        if wait:
            self.wait_ready()

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited {self.process.returncode}:\n{self.log()}")
            try:
                with Client(self.socket) as client:
                    client.call("fingerprint")
                return
            except DaemonUnavailable:
                time.sleep(0.01)
        raise RuntimeError(f"daemon not ready within {timeout} s:\n{self.log()}")

    def fingerprint(self) -> dict[str, Any]:
        with Client(self.socket, timeout=30) as client:
            result: dict[str, Any] = client.call("fingerprint")
            return result

    def cpu_seconds(self) -> float:
        times = self.psutil.cpu_times()
        return float(times.user + times.system)

    def cpu_seconds_with_children(self) -> float:
        """The daemon's CPU time and that of its children now running (the NVML worker)."""
        total = self.cpu_seconds()
        for child in self.psutil.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                times = child.cpu_times()
                total += times.user + times.system
        return total

    def rss_bytes(self) -> int:
        return int(self.psutil.memory_info().rss)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.process)
        self._log.close()

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class Seen:
    """One line from a subscriber process: when it read a notification, and its mirror after."""

    t_ns: int
    generation: int
    kind: str  # I: the subscribe answer, P: a patch, S: a full snapshot, E: a wrong base
    devices: int
    digest: str


class SubscriberProcess:
    """``python -m tests.bench.subscriber SOCKET`` in another process: it stamps each
    notification as it reads it and reports its mirror; a thread here queues the lines."""

    def __init__(self, sock: Path, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.subscriber", str(sock)],
            stdout=subprocess.PIPE,
            cwd=REPO,
            env=env,
        )
        self.lines: queue.Queue[Seen | None] = queue.Queue()
        self.seen: list[Seen] = []
        assert self.process.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self.process.stdout,))
        self._reader.daemon = True
        self._reader.start()
        self.initial = self.next(timeout=30)
        if self.initial.kind != "I":
            raise RuntimeError(f"subscriber did not start: {self.initial}")

    def _read(self, stdout: IO[bytes]) -> None:
        for line in stdout:
            t, generation, kind, devices, digest = line.split()
            self.lines.put(
                Seen(int(t), int(generation), kind.decode(), int(devices), digest.decode())
            )
        self.lines.put(None)

    def next(self, timeout: float) -> Seen:
        item = self.lines.get(timeout=timeout)
        if item is None:
            raise RuntimeError("the subscriber process ended")
        self.seen.append(item)
        return item

    def stop(self) -> None:
        stop_process(self.process)
        self._reader.join(timeout=5)
        if self.process.stdout:
            self.process.stdout.close()


def digest(snapshot: Any) -> str:
    """A short fingerprint of a snapshot's JSON, to compare mirrors across processes."""
    import hashlib

    text = json.dumps(snapshot, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def pick_pci_device() -> tuple[str, str] | None:
    """A PCI device whose uevent file we may write, and its class (6 hex digits): preferably an
    endpoint with a driver bound (not a bridge, class 0x06), like the GPUs the daemon follows."""
    if os.geteuid() != 0 or not PCI.is_dir():
        return None
    candidates = []
    for path in sorted(PCI.iterdir()):
        if os.access(path / "uevent", os.W_OK):
            pci_class = (path / "class").read_text().strip().removeprefix("0x")
            endpoint = (path / "driver").exists() and not pci_class.startswith("06")
            candidates.append((not endpoint, path.name, pci_class))
    if not candidates:
        return None
    _, address, pci_class = min(candidates)
    return address, pci_class


@contextlib.contextmanager
def uevent_file(address: str) -> Iterator[int]:
    """The device's uevent file, open for writing; each pwrite makes the kernel emit one uevent."""
    fd = os.open(PCI / address / "uevent", os.O_WRONLY)
    try:
        yield fd
    finally:
        os.close(fd)


def emit(fd: int, action: str) -> None:
    os.pwrite(fd, action.encode(), 0)


def alternate(
    start: Callable[[str, bool], Daemon],
    one: Callable[[int, SubscriberProcess], int],
    samples: int,
    rounds: int,
) -> dict[bool, list[list[int]]]:
    """The latencies of ``one`` event (``one(i, subscriber)``: its latency in ns) from daemons
    of two kinds, ``start(folder, kind)``, one daemon per round, each for its share of the
    samples after 20 unrecorded. The kinds go False, True, True, False, ...: drift in the
    machine's load falls on both alike. Returns each kind's samples, round by round."""
    latencies: dict[bool, list[list[int]]] = {False: [], True: []}
    for round_ in range(rounds):
        kind = round_ % 4 in (1, 2)
        with start(f"round-{round_}", kind) as daemon:
            subscriber = SubscriberProcess(daemon.socket)
            taken: list[int] = []
            try:
                for i in range(samples // rounds + 20):
                    latency = one(i, subscriber)
                    if i >= 20:
                        taken.append(latency)
                    time.sleep(0.002)  # one event at a time
            finally:
                subscriber.stop()
            latencies[kind].append(taken)
    return latencies


def pooled(rounds: list[list[int]]) -> Stats:
    return Stats.of_ns([sample for taken in rounds for sample in taken])


def cdi_on_off(
    results: Results,
    scenario: str,
    what: str,
    start: Callable[[str, bool], Daemon],
    one: Callable[[int, SubscriberProcess], int],
    samples: int,
    quick: bool,
    target_p99_ms: float | None = None,
) -> None:
    """``one`` event's latency with the CDI spec kept (``start(folder, True)``) and with
    ``--no-cdi``, from four daemons alternating."""
    latencies = alternate(start, one, samples, rounds=4)
    off, on = pooled(latencies[False]), pooled(latencies[True])
    results.latency(scenario, f"{what}, --no-cdi", off, quick=quick)
    results.latency(
        scenario, f"{what}, CDI spec kept", on, target_p99_ms=target_p99_ms, quick=quick
    )
    ratio = on.p99_ms / off.p99_ms
    results.add(
        Row(scenario, f"ratio {what}, CDI / --no-cdi",
            f"x{on.p50_ms / off.p50_ms:.2f} at p50, x{ratio:.2f} at p99", "p99 <= x1.20",
            "met" if ratio <= 1.2 else "MISSED", {"p50": on.p50_ms / off.p50_ms, "p99": ratio}),
    )  # fmt: skip


def against(
    results: Results,
    scenario: str,
    what: str,
    revision: str,
    start: Callable[[str, Path], Daemon],
    one: Callable[[int, SubscriberProcess], int],
    samples: int,
    quick: bool,
    rounds: int = 8,
) -> None:
    """``one`` event's latency with this tree's daemon and with the daemon of git ``revision``
    (checked out in a temporary worktree), ``start(folder, repo)``, alternating over ``rounds``
    daemons. The noise is how far the paired rounds' p50 ratios spread: the new daemon is worse
    beyond it only when every pair has it slower."""
    with worktree(revision) as other:
        latencies = alternate(
            lambda folder, old: start(folder, other if old else REPO), one, samples, rounds
        )
    new, old = pooled(latencies[False]), pooled(latencies[True])
    label = f"{what}, {revision}"
    results.latency(scenario, f"{what}, this tree", new, quick=quick)
    results.latency(scenario, label, old, quick=quick)
    pairs = sorted(
        Stats.of_ns(mine).p50_ms / Stats.of_ns(theirs).p50_ms
        for mine, theirs in zip(latencies[False], latencies[True], strict=True)
    )
    p50, p99 = new.p50_ms / old.p50_ms, new.p99_ms / old.p99_ms
    median = statistics.median(pairs)
    results.add(
        Row(scenario, f"ratio {what}, this tree / {revision}",
            f"x{p50:.2f} at p50 ({len(pairs)} paired rounds: x{pairs[0]:.2f} to x{pairs[-1]:.2f},"
            f" median x{median:.2f}), x{p99:.2f} at p99", "p50 not worse in every pair",
            "MISSED" if pairs[0] > 1.0 else "met",
            {"p50": p50, "p99": p99, "pairs": pairs, "median_pair": median}),
    )  # fmt: skip


@contextlib.contextmanager
def worktree(revision: str) -> Iterator[Path]:
    """``revision`` checked out (detached) in a temporary git worktree of this repository."""
    with tempfile.TemporaryDirectory(prefix="hotplug-against-") as tmp:
        path = Path(tmp) / "tree"
        git = ["git", "-C", str(REPO), "worktree"]
        subprocess.run([*git, "add", "--detach", "--quiet", str(path), revision], check=True)
        try:
            yield path
        finally:
            subprocess.run([*git, "remove", "--force", str(path)], check=True)

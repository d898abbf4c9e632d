"""Shared fixtures: a daemon in a subprocess on a real socket, simulated GPUs, subscriptions."""

from __future__ import annotations

import datetime
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from monitor.client import Client, DaemonUnavailable, Mirror
from monitor.nvmlsim import build_library
from monitor.sim import Simulator, umockdev_missing
from tests import reliability

# CI installs every tool the tests need: there, a missing tool fails the run instead of skipping.
IN_CI = os.environ.get("CI") == "true"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Keep what the reliability tests measured (tests/reliability.py)."""
    if not reliability.rows:
        return
    command = " ".join(["python -m pytest", *session.config.invocation_params.args])
    host = f"{os.cpu_count()} cores, Python {platform.python_version()}, {platform.release()}"
    header = {"command": command.strip(), "date": datetime.date.today().isoformat(), "host": host}
    reliability.write(reliability.report_path(), header)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if reliability.rows:
        terminalreporter.section("reliability (README table: python -m tests.reliability)")
        for row in reliability.rows:
            terminalreporter.write_line(" | ".join(row.values()))


def need(reason: str | None) -> None:
    """Skip (fail in CI) when ``reason`` says a needed tool or permission is missing."""
    if reason is None:
        return
    if IN_CI:
        pytest.fail(f"CI must run every test: {reason}")
    pytest.skip(reason)


def two_pci_classes() -> tuple[dict[str, str], str, str]:
    """Every PCI device's base class (2 hex digits), and two classes present on this host."""
    classes = {
        p.name: (p / "class").read_text()[2:4] for p in Path("/sys/bus/pci/devices").iterdir()
    }
    need(None if len(set(classes.values())) >= 2 else "needs PCI devices of two base classes")
    first, second = sorted(set(classes.values()))[:2]
    return classes, first, second


class Daemon:
    """``hotplug-monitor serve`` in a subprocess, with its stderr kept in a file."""

    def __init__(
        self,
        tmp: Path,
        args: list[str],
        env: dict[str, str] | None = None,
        socket: Path | None = None,
        nvml: bool = False,
    ) -> None:
        self.socket = socket or tmp / "monitor.sock"
        self.state_dir = tmp / "state"
        self.log_path = tmp / "daemon.log"
        command = [sys.executable, "-m", "monitor", "serve", "--socket", str(self.socket)]
        command += ["--state-dir", str(self.state_dir), "--log-target", "stderr"]
        if not nvml:
            command.append("--no-nvml")  # never the host's NVML, if it has one
        if "--cdi-dir" not in args:
            command.append("--no-cdi")  # never the host's /var/run/cdi
        command += args
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(command, stderr=self._log, env=env)
        self.wait_ready()

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited {self.process.returncode}:\n{self.log()}")
            try:
                with Client(self.socket) as client:
                    client.call("fingerprint")
                return
            except DaemonUnavailable:
                time.sleep(0.02)
        raise AssertionError(f"daemon not ready within {timeout} s:\n{self.log()}")

    def client(self, timeout: float | None = 10.0) -> Client:
        return Client(self.socket, timeout=timeout)

    def fingerprint(self) -> dict[str, Any]:
        with self.client() as client:
            result: dict[str, Any] = client.call("fingerprint")
            return result

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def settle_fds(self, baseline: int, timeout: float = 5.0) -> int:
        """The fd count once it is back to ``baseline`` (closes finish after the client's), or
        what it is at the deadline."""
        deadline = time.monotonic() + timeout
        while self.fd_count() > baseline and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.fd_count()

    def rss_mib(self) -> float:
        return float(psutil.Process(self.process.pid).memory_info().rss / (1 << 20))

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind, as in a crash."""
        self.process.kill()
        self.process.wait()
        self._log.close()

    def stop(self) -> int:
        if self._log.closed:
            return self.process.returncode
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    daemons: list[Daemon] = []

    def start(
        *args: str,
        env: dict[str, str] | None = None,
        socket: Path | None = None,
        nvml: bool = False,
    ) -> Daemon:
        daemon = Daemon(tmp_path, list(args), env, socket, nvml)
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        daemon.stop()


@pytest.fixture
def many_fds() -> Iterator[None]:
    """This test process opens thousands of sockets: raise its own limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need(None if hard >= 12_000 else f"needs RLIMIT_NOFILE hard limit >= 12000 (is {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(scope="session")
def nvml_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stand-in libnvidia-ml.so.1, built once per session (monitor/nvmlsim.py)."""
    return build_library(tmp_path_factory.mktemp("fakenvml-lib"))


@pytest.fixture
def sim() -> Iterator[Simulator]:
    need(umockdev_missing())
    with Simulator() as simulator:
        yield simulator


class Subscription:
    """A subscribed connection whose mirror of the snapshot follows every notification."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.mirror = Mirror(client.call("subscribe"))
        self.notifications: list[dict[str, Any]] = []
        self._stream = client.notifications()

    def next(self) -> dict[str, Any]:
        params = next(self._stream)
        self.notifications.append(params)
        self.mirror.apply(params)
        return params

    def until(self, condition: Callable[[Mirror], bool], timeout: float = 10.0) -> Mirror:
        """Read notifications until the mirror satisfies ``condition``."""
        deadline = time.monotonic() + timeout
        while not condition(self.mirror):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"condition not met; snapshot: {self.mirror.snapshot}")
            self.client.settimeout(remaining)
            try:
                self.next()
            except TimeoutError:
                raise AssertionError(
                    f"condition not met; snapshot: {self.mirror.snapshot}"
                ) from None
        return self.mirror


@pytest.fixture
def subscribe() -> Iterator[Callable[[Daemon], Subscription]]:
    opened: list[Client] = []

    def open_subscription(daemon: Daemon) -> Subscription:
        client = daemon.client()
        opened.append(client)
        return Subscription(client)

    yield open_subscription
    for client in opened:
        client.close()

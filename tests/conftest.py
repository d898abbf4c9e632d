"""Shared fixtures: a daemon in a subprocess on a real socket, simulated GPUs, subscriptions."""

from __future__ import annotations

import contextlib
import datetime
import importlib
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hypothesis
import psutil
import pytest

from monitor.sim.mig import EXAMPLE_UUIDS, mig_h100_nvml, write_mig_minors
from monitor.sim.nvml import FakeNvml, build_library
from monitor.sim.umockdev import Simulator, umockdev_missing
from monitor.wire.blocking import Client
from monitor.wire.errors import DaemonUnavailable
from monitor.wire.mirror import Mirror
from tests import reliability
from tests.hermetic import (  # the whole run's check that the host's daemon is left alone
    hide_system_socket,
    host_daemon_paths_untouched,  # noqa: F401 (a session fixture, autouse)
)
from tests.waiting import wait_until

# CI installs every tool the tests need: there, a missing tool fails the run instead of skipping.
IN_CI = os.environ.get("CI") == "true"

# Property tests: deterministic unless asked otherwise (whoever runs them, CI or not), so that a
# run's outcome depends on the code alone; "explore" draws new examples, more of them, each run.
# A failure prints the blob that reproduces it (@reproduce_failure).
hypothesis.settings.register_profile(
    "deterministic", derandomize=True, database=None, print_blob=True, max_examples=300,
    deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow],
)  # fmt: skip
hypothesis.settings.register_profile(
    "explore", derandomize=False, database=None, print_blob=True, max_examples=3000,
    deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow],
)  # fmt: skip
hypothesis.settings.load_profile(os.environ.get("HOTPLUG_HYPOTHESIS_PROFILE", "deterministic"))


# What a test needs, by the folder it is in: pure (no I/O), inprocess (trio and real sockets in
# this process), daemon (a daemon subprocess on this host's sysfs), host (root, the kernel,
# umockdev, podman, journald, Go, a kubelet...). ``-m pure`` runs the fast ones alone.
KINDS = ("pure", "inprocess", "daemon", "host")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        kind = next((k for k in KINDS if f"/tests/{k}/" in str(item.path)), None)
        if kind is not None:
            item.add_marker(kind)


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
        terminalreporter.section("reliability (docs/operating.md: python -m tests.reliability)")
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


# --- other users: forked children, since this interpreter may live where they cannot exec ----

GROUP = 4242  # a gid no account has: membership only by what a client process carries
ALICE, BOB, MALLORY = 60001, 60002, 60003  # uids no account has


def as_user(
    uid: int, groups: list[int], work: Callable[[], Any], as_root: Callable[[], None] = lambda: None
) -> Any:
    """``work()`` in a forked child running as ``uid`` with ``groups`` (primary first); what it
    returns (JSON), or ``{"child_error": repr(exception)}``. ``as_root()`` runs in the child
    first, before it drops to the user."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to the user, work, report, and leave without cleanup
        try:
            os.close(read)
            as_root()
            os.setgroups(groups[1:])
            os.setgid(groups[0])
            os.setuid(uid)
            result = json.dumps(work())
        except BaseException as exc:
            result = json.dumps({"child_error": repr(exc)})
        finally:
            os.write(write, result.encode())
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as reader:
        answer = json.loads(reader.read())
    os.waitpid(pid, 0)
    return answer


def call_as(
    uid: int, groups: list[int], path: Path, method: str, params: dict[str, Any]
) -> dict[str, Any]:
    """One request from a child process running as ``uid`` with ``groups`` (primary first)."""

    def ask() -> Any:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            request = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
            sock.sendall(json.dumps(request).encode() + b"\n")
            return json.loads(sock.makefile("rb").readline())

    answer: dict[str, Any] = as_user(uid, groups, ask)
    return answer


def cli_as(
    uid: int, groups: list[int], argv: list[str], env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """``hotplug-monitor ARGV`` run as ``uid`` in a forked child: exit status, stdout, stderr.

    Everything the command may import is imported first: the child, as another user, may not
    be able to read this interpreter's library. The host's own daemon is hidden from it
    (``hide_system_socket``): what it does must not depend on whether the host runs one."""
    for module in (
        "monitor.daemon.app",
        "monitor.cli.commands",
        "cysystemd.journal",
        "cysystemd.daemon",
    ):
        importlib.import_module(module)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:

        def run() -> int:
            os.environ.clear()
            os.environ.update(env or {"PATH": "/usr/bin:/bin"})
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            from monitor.cli import main

            # the child's own fds, not pytest's capture
            with open(1, "w", closefd=False) as stdout, open(2, "w", closefd=False) as stderr:
                sys.stdout, sys.stderr = stdout, stderr
                return main(argv)

        status = as_user(uid, groups, run, as_root=hide_system_socket)
        out.seek(0)
        err.seek(0)
        return status, out.read().decode(), err.read().decode()


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory other users can reach (pytest's tmp_path is private to root)."""
    directory = Path(tempfile.mkdtemp(prefix="hotplug-monitor-test-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory)


@pytest.fixture
def shared_socket(shared_tmp: Path) -> Path:
    """A socket path other users can reach."""
    return shared_tmp / "monitor.sock"


def hotplug_monitor(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """The command line, as a person runs it."""
    return subprocess.run(
        [sys.executable, "-m", "monitor", *args], capture_output=True, text=True, timeout=timeout
    )


def connect(daemon: Daemon) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(daemon.socket))  # blocking: waits while the listen backlog is full
    sock.settimeout(20)
    return sock


def read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        data += chunk
    return data


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
        if "--kmsg" not in args:
            command.append("--no-kmsg")  # never the host's kernel log unless a test asks
        command += args
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(command, stderr=self._log, env=env)
        try:
            self.wait_ready()
        except BaseException:  # not yet in any fixture's list: no teardown would stop it
            self.stop()
            raise

    def wait_ready(self, timeout: float = 20.0) -> None:
        def answers() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited {self.process.returncode}:\n{self.log()}")
            with Client(self.socket) as client:
                client.call("fingerprint")
            return True

        wait_until(
            answers,
            timeout,
            lambda: f"the daemon to answer:\n{self.log()}",
            ignoring=(DaemonUnavailable,),
        )

    def client(self, timeout: float | None = 10.0) -> Client:
        return Client(self.socket, timeout=timeout)

    def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """``hotplug-monitor COMMAND --socket OURS ARGS...``."""
        return hotplug_monitor(args[0], "--socket", str(self.socket), *args[1:], timeout=timeout)

    def fingerprint(self) -> dict[str, Any]:
        with self.client() as client:
            result: dict[str, Any] = client.call("fingerprint")
            return result

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def listening_sockets(self) -> int:
        """How many Unix sockets the daemon listens on (a deleted one's stays in /proc/net/unix
        while it is open)."""
        held = set()
        for fd in os.listdir(f"/proc/{self.process.pid}/fd"):
            with contextlib.suppress(OSError):  # closed meanwhile
                held.add(os.readlink(f"/proc/{self.process.pid}/fd/{fd}"))
        listening = 0x10000  # __SO_ACCEPTCON in the Flags column
        rows = [line.split() for line in Path("/proc/net/unix").read_text().splitlines()[1:]]
        return sum(f"socket:[{r[6]}]" in held and int(r[3], 16) & listening != 0 for r in rows)

    def settle_fds(self, baseline: int, timeout: float = 5.0) -> int:
        """The fd count once it is back to ``baseline`` (closes finish after the client's), or
        what it is at the deadline."""
        with contextlib.suppress(AssertionError):  # the caller says what the count must be
            wait_until(lambda: self.fd_count() <= baseline, timeout, interval=0.05)
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
    """The stand-in libnvidia-ml.so.1, built once per session (monitor/sim/nvml.py)."""
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


MIG_GPU = "0000:3b:00.0"  # the simulated H100 in MIG mode of the fixtures below, on NUMA node 0


@pytest.fixture
def mig_nvml(tmp_path: Path, nvml_lib: Path) -> FakeNvml:
    """The NVML stand-in with one H100 in MIG mode at ``MIG_GPU``, in ``monitor.sim.mig``'s
    example layout (two 1g.10gb instances and one 3g.40gb)."""
    return mig_h100_nvml(tmp_path, nvml_lib, MIG_GPU)


@pytest.fixture
def start_mig_daemon(
    tmp_path: Path, sim: Simulator, mig_nvml: FakeNvml, start_daemon: Callable[..., Daemon]
) -> Callable[..., Daemon]:
    """Start the daemon (with more flags) on that H100, with a mig-minors file of its own."""
    sim.add("nvidia-h100", MIG_GPU, 0)
    minors = write_mig_minors(tmp_path / "mig-minors")

    def start(*args: str) -> Daemon:
        env = {**sim.daemon_env(), **mig_nvml.env()}
        return start_daemon(
            "--udev-source", "udev", "--mig-minors", str(minors), *args, env=env, nvml=True
        )

    return start


@pytest.fixture
def mig_daemon(
    start_mig_daemon: Callable[..., Daemon], subscribe: Callable[[Daemon], Subscription]
) -> Daemon:
    """A daemon on that H100, once it shows every instance of the example layout."""
    daemon = start_mig_daemon()
    subscribe(daemon).until(lambda m: set(EXAMPLE_UUIDS) <= set(m.devices()), timeout=20)
    return daemon

"""``hotplug-monitor exporter`` as Prometheus uses it: Debian's real Prometheus server (2.42)
scrapes the exporter every second, against a real daemon on simulated GPUs (umockdev) with the
NVML stand-in, and everything is checked through Prometheus's own HTTP query API: a hot-added
GPU, a PCI error, an XID and a reservation each become the right series; the daemon going away
turns ``hotplug_monitor_up`` to 0 with the devices kept, stale, and back. ``promtool`` lints a
scrape and checks and unit-tests the alert rules; systemd checks the unit.

One Prometheus, daemon and exporter serve the whole module (Prometheus takes about 6 s to its
first sample); the tests run in order and each leaves the state the next expects.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from monitor.sim.nvml import FakeGpu, FakeNvml
from monitor.sim.umockdev import Simulator, umockdev_missing
from monitor.wire import requests
from tests.conftest import ALICE, GROUP, MALLORY, Daemon, need
from tests.waiting import wait_until

pytestmark = pytest.mark.umockdev

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "prometheus" / "hotplug-monitor.rules.yml"
RULES_TEST = ROOT / "prometheus" / "hotplug-monitor.rules.test.yml"
UNITS = ROOT / "systemd"
A, B, C = "0000:3b:00.0", "0000:86:00.0", "0000:af:00.0"
UUIDS = {
    A: "GPU-0a0a0a0a-1111-2222-3333-444444444444",
    B: "GPU-0b0b0b0b-5555-6666-7777-888888888888",
    C: "GPU-0c0c0c0c-9999-aaaa-bbbb-cccccccccccc",
}
H100 = "NVIDIA H100 80GB HBM3"
JOB = "hotplug-monitor"
KERNEL = ("--udev-source", "kernel", "--match-class", "0x06", "--match-class", "0xff")


def tool(name: str) -> str:
    path = shutil.which(name)
    need(None if path else f"needs {name} (Debian package prometheus)")
    assert path is not None
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_http(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 20) -> None:
    def answers() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"{url}: exited {process.returncode}:\n{log.read_text()}")
        with urllib.request.urlopen(url, timeout=2):
            return True

    wait_until(answers, timeout, lambda: f"{url} to answer:\n{log.read_text()}", 0.05, (OSError,))


def stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def gpu(address: str, minor: int) -> FakeGpu:
    gpu = FakeGpu(bus_id=address, uuid=UUIDS[address], minor=minor)
    if address == A:
        gpu = attrs.evolve(gpu, util_gpu=71, memory_used_mib=40960, temperature_c=64)
    return gpu


def query(prometheus_port: int, promql: str) -> list[dict[str, Any]]:
    """An instant query's result vector."""
    url = f"http://127.0.0.1:{prometheus_port}/api/v1/query?" + urllib.parse.urlencode(
        {"query": promql}
    )
    with urllib.request.urlopen(url, timeout=5) as answer:
        body = json.load(answer)
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


@contextlib.contextmanager
def scraped(
    work: Path, daemon_socket: Path, exporter_port: int, prometheus_port: int, rules: list[str]
) -> Iterator[subprocess.Popen[bytes]]:
    """The exporter of the daemon on ``daemon_socket``, and Debian's Prometheus scraping it every
    second with ``rules``, both answering; both stopped after (the exporter cleanly)."""
    exporter_log = work / "exporter.log"
    exporter = subprocess.Popen(
        [sys.executable, "-m", "monitor", "exporter", "--socket", str(daemon_socket),
         "--listen", f"127.0.0.1:{exporter_port}"],
        stderr=exporter_log.open("wb"),
    )  # fmt: skip
    config = work / "prometheus.yml"
    config.write_text(
        json.dumps(  # YAML is a superset of JSON
            {
                "global": {
                    "scrape_interval": "1s",
                    "scrape_timeout": "1s",
                    "evaluation_interval": "1s",
                },
                "rule_files": rules,
                "scrape_configs": [
                    {
                        "job_name": JOB,
                        "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}],
                    }
                ],
            }
        )
    )
    prometheus_log = work / "prometheus.log"
    server = subprocess.Popen(
        [tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={work / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prometheus_port}"],
        stdout=subprocess.DEVNULL, stderr=prometheus_log.open("wb"),
    )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{exporter_port}/metrics", exporter, exporter_log)
        wait_http(f"http://127.0.0.1:{prometheus_port}/-/ready", server, prometheus_log)
        yield exporter
    finally:
        stop(server)
        assert stop(exporter) == 0, exporter_log.read_text()


@attrs.define
class Stack:
    """The daemon, the exporter and Prometheus scraping it, and how to ask Prometheus."""

    work: Path
    sim: Simulator
    nvml: FakeNvml
    daemon: Daemon
    exporter: subprocess.Popen[bytes]
    exporter_port: int
    prometheus_port: int

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.exporter_port}/metrics"

    def query(self, promql: str) -> list[dict[str, Any]]:
        return query(self.prometheus_port, promql)

    def until(
        self, promql: str, condition: Callable[[list[dict[str, Any]]], bool], timeout: float = 30
    ) -> list[dict[str, Any]]:
        """Ask again until the result satisfies ``condition``."""
        last: list[list[dict[str, Any]]] = []

        def met() -> tuple[list[dict[str, Any]]] | None:  # in a tuple: [] may be the answer
            last[:] = [self.query(promql)]
            return (last[0],) if condition(last[0]) else None

        return wait_until(met, timeout, lambda: f"{promql}: still {last}", interval=0.25)[0]

    def value(self, promql: str, expected: float, timeout: float = 30) -> list[dict[str, Any]]:
        """Wait until the query has exactly one series, of value ``expected``."""
        return self.until(
            promql, lambda r: len(r) == 1 and float(r[0]["value"][1]) == expected, timeout
        )

    def start_daemon(self) -> Daemon:
        return Daemon(
            self.work,
            ["--udev-source", "udev"],
            env={**self.sim.daemon_env(), **self.nvml.env()},
            socket=self.work / "monitor.sock",
            nvml=True,
        )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, nvml_lib: Path) -> Iterator[Stack]:
    tool("prometheus")  # before anything starts: a missing server is said first
    need(umockdev_missing())
    work = tmp_path_factory.mktemp("prometheus")
    with Simulator() as sim:
        sim.add("nvidia-h100", A, 0)
        sim.add("nvidia-h100", B, 1)
        nvml = FakeNvml(work / "nvml", nvml_lib, [gpu(A, 0), gpu(B, 1)])
        stack = Stack(work, sim, nvml, None, None, free_port(), free_port())  # type: ignore[arg-type]
        stack.daemon = stack.start_daemon()
        try:
            with scraped(
                work, stack.daemon.socket, stack.exporter_port, stack.prometheus_port, [str(RULES)]
            ) as stack.exporter:
                yield stack
        finally:
            stack.daemon.stop()


def labels(result: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [series["metric"] for series in result]


def test_prometheus_scrapes_the_devices_and_their_telemetry(stack: Stack) -> None:
    stack.value(f'up{{job="{JOB}"}}', 1)
    stack.value("hotplug_monitor_up", 1)
    info = stack.until("hotplug_monitor_device_info", lambda r: len(r) == 2)
    by_device = {m["device"]: m for m in labels(info)}
    assert set(by_device) == {A, B}
    assert by_device[A]["uuid"] == UUIDS[A]
    assert by_device[A]["name"] == H100
    assert by_device[A]["group"] == f"nvidia/gpu/{H100}"
    assert by_device[A]["driver"] == "nvidia"
    assert by_device[A]["vendor"] == "nvidia" and by_device[A]["type"] == "gpu"
    stack.value(f'hotplug_monitor_device_healthy{{device="{A}"}}', 1)
    stack.value(f'hotplug_monitor_device_temperature_celsius{{device="{A}"}}', 64)
    stack.value(f'hotplug_monitor_device_gpu_utilization_ratio{{device="{A}"}}', 0.71)
    stack.value(f'hotplug_monitor_device_memory_used_bytes{{device="{A}"}}', 40960 * 2**20)
    stack.value("hotplug_monitor_stats_subscribers", 1)
    stack.value('hotplug_monitor_resyncs_total{cause="start"}', 1)
    stack.until("hotplug_monitor_publish_latency_seconds_count", lambda r: len(r) == 1)


def test_a_hot_added_gpu_becomes_its_series(stack: Stack) -> None:
    stack.nvml.set_gpus([gpu(A, 0), gpu(B, 1), gpu(C, 2)])
    stack.sim.add("nvidia-h100", C, 1)
    info = stack.until(f'hotplug_monitor_device_info{{device="{C}"}}', lambda r: len(r) == 1)
    assert labels(info)[0]["uuid"] == UUIDS[C]
    assert labels(info)[0]["numa_node"] == "1"
    stack.value(f'hotplug_monitor_device_healthy{{device="{C}"}}', 1)
    stack.value(f'hotplug_monitor_device_temperature_celsius{{device="{C}"}}', 30)
    stack.value("count(hotplug_monitor_device_info)", 3)


def test_a_pci_error_turns_the_device_unhealthy_until_it_recovers(stack: Stack) -> None:
    stack.sim.pci_error(B, "BEGIN_RECOVERY")
    stack.value(f'hotplug_monitor_device_healthy{{device="{B}"}}', 0)
    stack.value(f'hotplug_monitor_device_healthy{{device="{A}"}}', 1)
    stack.sim.pci_error(B, "SUCCESSFUL_RECOVERY")
    stack.value(f'hotplug_monitor_device_healthy{{device="{B}"}}', 1)


def test_an_xid_is_counted_by_xid_and_a_fatal_one_makes_the_gpu_unhealthy(stack: Stack) -> None:
    stack.nvml.xid(A, 13)  # an application error: counted, the GPU stays healthy
    stack.value(f'hotplug_monitor_device_xids_total{{device="{A}",xid="13"}}', 1)
    stack.value(f'hotplug_monitor_device_healthy{{device="{A}"}}', 1)
    stack.nvml.xid(A, 48)  # NVIDIA's catalog: WORKFLOW_XID_48, a reset
    stack.value(f'hotplug_monitor_device_xids_total{{device="{A}",xid="48"}}', 1)
    stack.value(f'hotplug_monitor_device_healthy{{device="{A}"}}', 0)
    stack.value(f'hotplug_monitor_device_health{{device="{A}",state="needs reset"}}', 1)
    # The needs-reset XID rule, loaded by this Prometheus, fires at once (it has no "for").
    alerts = stack.until(
        'ALERTS{alertname="HotplugMonitorXidNeedsReset",alertstate="firing"}', lambda r: len(r) == 1
    )
    found = labels(alerts)[0]
    assert (found["xid"], found["action"], found["device"]) == ("48", "WORKFLOW_XID_48", A)


def test_a_reservation_shows_its_owner(stack: Stack) -> None:
    with stack.daemon.client() as client:
        client.ask(requests.reserve([B], owner="kubelet"))
    stack.value(f'hotplug_monitor_device_reserved{{device="{B}",owner="kubelet"}}', 1)
    stack.value(f'hotplug_monitor_device_reserved{{device="{C}",owner=""}}', 0)
    stack.value("hotplug_monitor_leases", 1)
    with stack.daemon.client() as client:
        client.ask(requests.release([B], owner="kubelet"))
    stack.value(f'hotplug_monitor_device_reserved{{device="{B}",owner=""}}', 0)


def test_a_scrape_passes_promtools_lint(stack: Stack) -> None:
    with urllib.request.urlopen(stack.metrics_url, timeout=5) as answer:
        assert answer.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        scrape = answer.read()
    assert b"hotplug_monitor_device_temperature_celsius{" in scrape  # telemetry is in it
    checked = subprocess.run(
        [tool("promtool"), "check", "metrics"], input=scrape, capture_output=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout == checked.stderr == b""


def test_keep_alive_and_the_pages_that_are_not_there(stack: Stack) -> None:
    with socket.create_connection(("127.0.0.1", stack.exporter_port), timeout=5) as sock:
        reader = sock.makefile("rb")

        def ask(request: bytes) -> tuple[int, dict[str, str], bytes]:
            sock.sendall(request)
            status = int(reader.readline().split()[1])
            headers = {}
            while (line := reader.readline()) != b"\r\n":
                name, _, value = line.decode().partition(":")
                headers[name.lower()] = value.strip()
            body = (
                b"" if request.startswith(b"HEAD") else reader.read(int(headers["content-length"]))
            )
            return status, headers, body

        get = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        for _ in range(3):  # one connection, three scrapes
            status, _, body = ask(get)
            assert status == 200 and body.startswith(b"# HELP hotplug_monitor_up")
        assert ask(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200
        assert ask(b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 404
        status, headers, body = ask(b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200 and int(headers["content-length"]) > 1000 and body == b""
        status, headers, _ = ask(
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
        )
        assert status == 405 and headers["allow"] == "GET, HEAD"
        huge = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
        sock.sendall(huge)
        assert int(reader.readline().split()[1]) == 431
        while reader.readline() not in (b"", b"\r\n"):
            pass
        reader.read()  # the body, then the exporter closes the connection
    with socket.create_connection(("127.0.0.1", stack.exporter_port), timeout=5) as sock:
        sock.sendall(b"NOT HTTP\r\n\r\n")
        assert sock.makefile("rb").readline().split()[1] == b"400"


def test_while_the_daemon_is_away_the_devices_stay_stale_and_come_back(stack: Stack) -> None:
    stack.daemon.stop()
    stack.value("hotplug_monitor_up", 0)
    stale = stack.until("hotplug_monitor_device_stale == 1", lambda r: len(r) == 3)
    assert {m["device"] for m in labels(stale)} == {A, B, C}
    stack.value(f'up{{job="{JOB}"}}', 1)  # the exporter itself still answers
    # what only the daemon can vouch for now is gone
    stack.until("hotplug_monitor_device_temperature_celsius", lambda r: r == [])
    stack.daemon = stack.start_daemon()
    stack.value("hotplug_monitor_up", 1)
    stack.until("hotplug_monitor_device_stale == 0", lambda r: len(r) == 3)
    stack.value(f'hotplug_monitor_device_temperature_celsius{{device="{A}"}}', 64)
    stack.value("hotplug_monitor_stats_subscribers", 1)


# --- what ships beside it --------------------------------------------------------------------


def test_the_alert_rules_check_and_pass_their_unit_tests() -> None:
    checked = subprocess.run(
        [tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    rules = RULES.read_text().count("- alert:")
    assert f"SUCCESS: {rules} rules found" in checked.stdout
    tested = subprocess.run(
        [tool("promtool"), "test", "rules", RULES_TEST.name],
        cwd=RULES_TEST.parent,
        capture_output=True,
        text=True,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def systemd_tool(name: str) -> str:
    path = shutil.which(name)
    need(None if path else f"needs {name} (Debian package systemd)")
    assert path is not None
    return path


def test_the_unit_verifies_runs_as_its_own_user_in_the_group_and_is_hardened(
    tmp_path: Path,
) -> None:
    script = Path(sys.executable).parent / "hotplug-monitor"
    need(None if script.exists() else f"no console script next to {sys.executable}")
    unit = "hotplug-monitor-exporter.service"
    text = (UNITS / unit).read_text()
    (tmp_path / unit).write_text(text.replace("/usr/local/bin/hotplug-monitor", str(script)))
    verified = subprocess.run(
        [systemd_tool("systemd-analyze"), "verify", unit],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert verified.returncode == 0 and verified.stderr == "", verified.stderr
    security = subprocess.run(
        [systemd_tool("systemd-analyze"), "security", "--offline=true", unit],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    found = re.search(rf"Overall exposure level for {unit}: ([0-9.]+)", security.stdout)
    assert found and float(found.group(1)) <= 2.0, security.stdout + security.stderr
    assert "User=hotplug-monitor-exporter\n" in text
    assert "SupplementaryGroups=hotplug-monitor-read\n" in text  # never the full group
    sysusers = [
        line.split()
        for line in (UNITS / "hotplug-monitor-exporter.sysusers").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ["m", "hotplug-monitor-exporter", "hotplug-monitor-read"] in sysusers
    assert ["m", "hotplug-monitor-exporter", "hotplug-monitor"] not in sysusers
    assert sysusers[0][:2] == ["u", "hotplug-monitor-exporter"]


# --- the command line ------------------------------------------------------------------------


def exporter(*args: str, env_code: str = "") -> subprocess.CompletedProcess[str]:
    code = (
        "import sys\n" + env_code + "\nfrom monitor.cli import main\nsys.exit(main(sys.argv[1:]))"
    )
    return subprocess.run(
        [sys.executable, "-c", code, "exporter", *args], capture_output=True, text=True, timeout=30
    )


def test_mistakes_are_one_line_errors() -> None:
    bad = exporter("--listen", "nowhere")
    assert bad.returncode == 2
    assert bad.stderr == (
        "hotplug-monitor: error: --listen must be HOST:PORT with a port from 1 to 65535, "
        "not 'nowhere'\n"
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = exporter("--socket", "/nonexistent.sock", "--listen", f"127.0.0.1:{port}")
    assert busy.returncode == 1
    assert busy.stderr.splitlines()[-1] == (
        f"hotplug-monitor: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    assert "Traceback" not in busy.stderr
    missing = exporter(env_code="sys.modules['h11'] = None")
    assert missing.returncode == 1
    assert missing.stderr.startswith(
        "hotplug-monitor: error: exporter needs the exporter extra: "
        "./install.sh --with exporter from the source, or "
        f"{sys.executable} -m pip install 'hotplug-monitor[exporter]'"
    )
    assert len(missing.stderr.splitlines()) == 1
    helped = exporter("--help")
    assert helped.returncode == 0 and "localhost:10082" in helped.stdout


# --- as it runs: another user, in the daemon's group -----------------------------------------


def exporter_as(uid: int, groups: list[int], socket_path: Path, port: int, log: Path) -> int:
    """``hotplug-monitor exporter`` in a forked child running as ``uid`` with ``groups``
    (primary first); its pid. Forked, not exec'd: that user may not read this interpreter."""
    import encodings.idna  # noqa: F401  (looked up lazily by getaddrinfo, after the fork)

    from monitor.adapters.exporter import run  # imported here, before the fork

    with log.open("wb") as out:
        pid = os.fork()
        if pid == 0:  # the child: drop to the user and serve until SIGTERM
            status = 99
            try:
                os.dup2(out.fileno(), 2)
                sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 (the child's own fd)
                os.setgroups(groups[1:])
                os.setgid(groups[0])
                os.setuid(uid)
                status = run.main(socket_path, f"127.0.0.1:{port}")
            except BaseException as error:
                os.write(2, f"child failed: {error!r}\n".encode())
            finally:
                os._exit(status)
    return pid


def scrape_until(port: int, condition: Callable[[str], bool], timeout: float = 20) -> str:
    last = [""]

    def met() -> str | None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
            last[0] = str(answer.read().decode())
        return last[0] if condition(last[0]) else None

    return wait_until(
        met, timeout, lambda: f"a scrape to meet the condition; the last:\n{last[0][:2000]}",
        interval=0.1, ignoring=(OSError,),
    )  # fmt: skip


def test_an_unprivileged_member_of_the_group_exports_and_an_outsider_cannot(
    start_daemon: Callable[..., Daemon], shared_socket: Path, tmp_path: Path
) -> None:
    daemon = start_daemon(*KERNEL, "--group", str(GROUP), socket=shared_socket)
    groups = daemon.fingerprint()["snapshot"]["groups"].values()
    devices = sum(len(group["devices"]) for group in groups)
    assert devices > 0
    member, outsider = free_port(), free_port()
    pids = [
        exporter_as(ALICE, [ALICE, GROUP], shared_socket, member, tmp_path / "member.log"),
        exporter_as(MALLORY, [MALLORY], shared_socket, outsider, tmp_path / "outsider.log"),
    ]
    try:
        # up once subscribed; the daemon's counters once its first status answer is in
        text = scrape_until(
            member, lambda t: "hotplug_monitor_up 1.0" in t and "hotplug_monitor_leases " in t
        )
        assert text.count("hotplug_monitor_device_info{") == devices
        assert "hotplug_monitor_leases 0.0" in text
        # The socket is the group's (0660): the outsider's exporter answers, with up 0.
        text = scrape_until(outsider, lambda t: "hotplug_monitor_up 0.0" in t)
        assert "hotplug_monitor_device_info{" not in text
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        statuses = [os.waitpid(pid, 0)[1] for pid in pids]
    assert statuses == [0, 0], (tmp_path / "member.log").read_text()
    said = (tmp_path / "member.log").read_text()
    assert f"serving http://127.0.0.1:{member}/metrics" in said
    assert "subscribed to the daemon" in said and "running as root" not in said
    assert (
        "cannot be reached (permission denied: run the exporter as a member of the daemon's "
        "group)" in (tmp_path / "outsider.log").read_text()
    )

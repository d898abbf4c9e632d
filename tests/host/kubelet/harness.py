"""The pieces the kubelet tests run: the kubelet builds (tests/host/kubelet/build.sh, cached),
the kubelet's own device manager driven through our Go driver (devicemanager_test.go), and
``hotplug-monitor kubelet-plugin`` as a subprocess.

Driver commands (one JSON object per line; each answered on a line starting ``@@ ``):

- ``start`` ``{"socket", "numa_nodes"}``: ``newManagerImpl(socket, topology)`` and ``Start``;
- ``restart``: ``Stop``, then a new manager on the same directory (as a kubelet restart: it
  deletes every socket there); ``stop``;
- ``capacity``; ``wait`` ``{"resource", "capacity"?, "allocatable"?, "timeout_ms"}``: until
  ``GetCapacity`` says so, with ``received_unix_ns``;
- ``devices`` ``{"resource"}``: the manager's devices with health and NUMA nodes;
- ``allocate`` ``{"pod", "resource", "count"}``: a pod with one container asking ``count``;
  ``Allocate`` then ``GetDeviceRunContainerOptions``: envs, devices, mounts, device_ids;
- ``remove_pod`` ``{"pod"}``: the pod leaves the active pods;
- ``serve_pod_resources`` ``{"socket", "versions"?}``: the kubelet's PodResources servers.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from tests.conftest import need
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[3]
BUILD = Path(__file__).resolve().parent / "build.sh"
CACHE = Path(os.environ.get("HOTPLUG_KUBELET_CACHE", "/var/cache/hotplug-monitor/kubelet"))
PLUGIN = [sys.executable, "-m", "monitor", "kubelet-plugin"]
RESOURCE = "hotplug-monitor.io/nvidia-gpu"


def build(what: str) -> Path:
    """The binary ``build.sh WHAT`` built or found in its cache (minutes the first time)."""
    need(None if shutil.which("go") else "go not installed (apt-get install golang-go)")
    need(None if shutil.which("apt-get") else "apt-get not found: the kubelet comes from Debian")
    if os.geteuid() != 0:
        need("the kubelet build caches in /var/cache and needs root")
    done = subprocess.run(
        ["nice", "-n", "10", str(BUILD), what], capture_output=True, text=True, timeout=3000
    )
    if done.returncode != 0:
        raise RuntimeError(f"{BUILD} {what} failed:\n{done.stdout[-4000:]}{done.stderr[-4000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def plugin_env() -> dict[str, str]:
    """The environment a plugin gets: this one without umockdev's preload (only the daemon
    sees simulated hardware; the plugin never looks at sysfs)."""
    return {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "UMOCKDEV_DIR")}


class Driven:
    """A process answering one JSON line per command, on lines that start with ``@@ ``."""

    def __init__(self, command: list[str], env: Mapping[str, str], log: Path) -> None:
        self.log_path = log
        self._log = log.open("ab")
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=dict(env),
            cwd=REPO,
        )
        self._answers: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, args=(self._process.stdout,), daemon=True).start()

    def _read(self, stream: IO[bytes] | None) -> None:
        assert stream is not None
        for line in stream:
            if line.startswith(b"@@ "):
                self._answers.put(json.loads(line[3:]))
        self._answers.put(None)

    def request(self, op: str, timeout: float = 60, **params: Any) -> dict[str, Any]:
        assert self._process.stdin is not None
        self._process.stdin.write(json.dumps({"op": op, **params}).encode() + b"\n")
        self._process.stdin.flush()
        try:
            answer = self._answers.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no answer to {op} in {timeout} s:\n{self.log()}") from None
        if answer is None:
            raise AssertionError(f"the driver exited during {op}:\n{self.log()}")
        return answer

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def close(self) -> None:
        if self._process.poll() is None:
            assert self._process.stdin is not None
            self._process.stdin.close()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._log.close()


class DeviceManager(Driven):
    """The kubelet's device manager (its own code, built from Debian's kubernetes source)."""

    def __init__(self, binary: Path, log: Path) -> None:
        env = {**plugin_env(), "HOTPLUG_MONITOR_DRIVER": "1"}
        super().__init__([str(binary), "-test.run", "^TestHotplugMonitorDriver$"], env, log)

    def wait(
        self,
        resource: str = RESOURCE,
        *,
        capacity: int | None = None,
        allocatable: int | None = None,
        timeout: float = 20,
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"resource": resource, "timeout_ms": int(timeout * 1000)}
        if capacity is not None:
            params["capacity"] = capacity
        if allocatable is not None:
            params["allocatable"] = allocatable
        answer = self.request("wait", timeout=timeout + 10, **params)
        assert "error" not in answer, (answer, params, self.log())
        return answer

    def devices(self, resource: str = RESOURCE) -> dict[str, dict[str, Any]]:
        return {d["id"]: d for d in self.request("devices", resource=resource)["devices"]}


class PluginProcess:
    """``hotplug-monitor kubelet-plugin`` with its stderr kept in a file."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log_path = log
        self._log = log.open("ab")
        self.started_ns = time.time_ns()
        self.process = subprocess.Popen(
            [*PLUGIN, *args],
            stderr=self._log,
            stdout=subprocess.DEVNULL,
            env=plugin_env(),
            cwd=REPO,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def until_logged(self, text: str, timeout: float = 20, count: int = 1) -> None:
        def logged() -> bool:
            assert self.process.poll() is None, f"the plugin exited:\n{self.log()}"
            return self.log().count(text) >= count

        wait_until(logged, timeout, lambda: f"{text!r} logged:\n{self.log()}", interval=0.05)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

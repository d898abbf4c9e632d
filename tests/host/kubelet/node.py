"""Level 2's node: the real kubelet (built from Debian's kubernetes source) with Debian's
containerd and runc, and ``hotplug-monitor kubelet-plugin``, in a mount namespace of their own.

Run as ``unshare -m --propagation private -- python -m tests.host.kubelet.node``; it reads one
JSON command per line and answers each on a line starting ``@@ `` (``harness.Driven``):

- ``setup`` ``{"top", "kubelet", "daemon_socket", "plugin_args"}``: temp dirs bound over
  ``/var/lib``, ``/var/log`` and ``/run`` (kubelet 1.20 hardcodes its device plugin directory and
  ``/var/log/pods``), a private ``/dev`` (the host's basic nodes bound in; the GPU nodes the
  daemon's plan names made as real character devices, since containerd opens each device it
  passes on), two images packed from busybox-static (a pause and a shell), containerd, the
  kubelet (standalone: no API server), then the plugin, waiting for its registration;
- ``pod`` ``{"name", "manifest"}``: a static pod manifest dropped in (only after registration:
  a pod admitted before its resource exists fails and is never retried);
- ``teardown``: every process stopped, the containers' tasks killed, runc's cgroups removed.

The test reads the kubelet's read-only port (``setup`` answers its address) and the pods' logs
under the temp ``/var/log`` from outside: the network and the temp dirs are shared. The kubelet's
ports are free ones, not its defaults (10250, 10248, 10255), which a kubelet on the host or
another test run may hold.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from monitor.wire import requests
from monitor.wire.blocking import Client
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[3]
BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "sleep", "ls", "cat", "env", "test", "echo")
PAUSE_IMAGE = "localhost/hotplug-monitor-pause:1"
SHELL_IMAGE = "localhost/hotplug-monitor-busybox:1"
NODE_NAME = "hotplug-node"
BASIC_NODES = ("null", "zero", "full", "random", "urandom", "tty", "ptmx", "kmsg")
PLUGIN = [sys.executable, "-m", "monitor", "kubelet-plugin"]


def _run(*command: str, timeout: float = 120) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {done.returncode}\n{done.stdout}{done.stderr}")
    return done.stdout


def _wait(check: Any, timeout: float, what: str) -> float:
    """Seconds until ``check()`` is true (the node's start-up times are reported)."""
    began = time.monotonic()
    wait_until(check, timeout, what, interval=0.05)
    return time.monotonic() - began


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports on 127.0.0.1 that nothing listens on now."""
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in held:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in held]


def image_tar(name: str, cmd: list[str]) -> bytes:
    """A docker-archive image of busybox-static and its applets, for ``ctr images import``."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        for directory in ("bin", "dev", "proc", "sys", "etc", "tmp"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        tar.add(BUSYBOX, "bin/busybox")
        for applet in APPLETS:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
    layer_bytes = layer.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": cmd, "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
    ).encode()
    manifest = json.dumps(
        [{"Config": "config.json", "RepoTags": [name], "Layers": ["layer.tar"]}]
    ).encode()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for member, data in (
            ("layer.tar", layer_bytes),
            ("config.json", config),
            ("manifest.json", manifest),
        ):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _node_numbers(path: str) -> tuple[int, int]:
    """A major and minor for a stand-in node: NVIDIA's 195, DRM's 226, the name's number."""
    digits = re.findall(r"\d+", Path(path).name)
    minor = int(digits[-1]) % 256 if digits else 255
    return (226 if "/dri/" in path else 195), minor


class Node:
    def __init__(self) -> None:
        self.top = Path()
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: list[Any] = []

    def _start(self, name: str, command: list[str], env: dict[str, str] | None = None) -> None:
        log = (self.top / f"{name}.log").open("ab")
        self.logs.append(log)
        self.processes[name] = subprocess.Popen(
            command, stdout=log, stderr=log, env=env, cwd=REPO, start_new_session=True
        )

    def _private_dev(self) -> None:
        """A tmpfs /dev with the host's basic nodes bound in, so that nodes made for the test
        stay in this namespace."""
        old = self.top / "olddev"
        old.mkdir()
        _run("mount", "--rbind", "/dev", str(old))
        _run("mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", "/dev")
        for name in BASIC_NODES:
            if (old / name).exists():
                Path("/dev", name).touch()
                _run("mount", "--bind", str(old / name), f"/dev/{name}")
        for name in ("pts", "shm", "mqueue"):
            Path("/dev", name).mkdir()
        _run("mount", "--rbind", str(old / "pts"), "/dev/pts")
        _run("mount", "-t", "tmpfs", "tmpfs", "/dev/shm")
        for link, target in (
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
        ):
            Path("/dev", link).symlink_to(target)

    def _gpu_nodes(self, daemon_socket: Path, device_ids: list[str]) -> list[str]:
        """Real character devices at the paths the daemon's plan for ``device_ids`` names
        (its view of /dev is umockdev's), and the by-path links beside DRM nodes."""
        made = []
        with Client(daemon_socket) as client:
            plan = client.ask(requests.reserve(device_ids, owner="kubelet"))
            client.ask(requests.release(reservation_id=plan["reservation_id"], owner="kubelet"))
        for spec in plan["devices"]:
            path = Path(spec["host_path"])
            path.parent.mkdir(parents=True, exist_ok=True)
            major, minor = _node_numbers(str(path))
            os.mknod(path, 0o666 | 0o020000, os.makedev(major, minor))
            made.append(str(path))
        for mount in plan["mounts"]:
            link = Path(mount["host_path"])
            kind = "card" if link.name.endswith("-card") else "render"
            node = next((p for p in made if f"/dri/{kind}" in p), None)
            if node is not None:
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(os.path.relpath(node, link.parent))
                made.append(str(link))
        return made

    def setup(self, command: dict[str, Any]) -> dict[str, Any]:
        self.top = Path(command["top"])
        began = time.monotonic()
        for name in ("varlib", "varlog", "run", "manifests", "containerd"):
            (self.top / name).mkdir()
        for source, target in (("varlib", "/var/lib"), ("varlog", "/var/log"), ("run", "/run")):
            _run("mount", "--bind", str(self.top / source), target)
        self._private_dev()
        nodes = self._gpu_nodes(Path(command["daemon_socket"]), command["device_ids"])
        sock = self.top / "containerd" / "containerd.sock"
        config = self.top / "containerd" / "config.toml"
        config.write_text(
            f"""version = 2
root = "{self.top}/containerd/root"
state = "{self.top}/containerd/state"
[grpc]
  address = "{sock}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
"""
        )
        self._start("containerd", ["containerd", "--config", str(config)])
        _wait(sock.exists, 30, "containerd's socket")
        for name, cmd in ((PAUSE_IMAGE, ["/bin/sleep", "2147483647"]), (SHELL_IMAGE, ["/bin/sh"])):
            tar = self.top / f"{name.split('/')[-1].replace(':', '-')}.tar"
            tar.write_bytes(image_tar(name, cmd))
            _run("ctr", "-a", str(sock), "-n", "k8s.io", "images", "import",
                 "--snapshotter", "native", str(tar))  # fmt: skip
        port, healthz, read_only = free_ports(3)
        self.read_only = f"http://127.0.0.1:{read_only}"
        kubelet = [
            command["kubelet"],
            "--container-runtime=remote",
            f"--container-runtime-endpoint=unix://{sock}",
            f"--pod-manifest-path={self.top / 'manifests'}",
            "--file-check-frequency=1s",
            "--sync-frequency=2s",
            "--fail-swap-on=false",
            "--cgroups-per-qos=false",
            "--enforce-node-allocatable=",
            "--cgroup-driver=cgroupfs",
            "--address=127.0.0.1",
            f"--port={port}",
            f"--read-only-port={read_only}",
            "--healthz-bind-address=127.0.0.1",
            f"--healthz-port={healthz}",
            f"--hostname-override={NODE_NAME}",
            "--eviction-hard=memory.available<1Mi",
            "--image-gc-high-threshold=100",
            "--image-gc-low-threshold=99",
            "--v=2",
        ]
        kubelet_began = time.monotonic()
        self._start("kubelet", kubelet)
        socket_s = _wait(Path("/var/lib/kubelet/device-plugins/kubelet.sock").exists, 60,
                         "the kubelet's kubelet.sock")  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "UMOCKDEV_DIR")}
        plugin_began = time.monotonic()
        self._start(
            "plugin", [*PLUGIN, "--socket", command["daemon_socket"], *command["plugin_args"]], env
        )
        plugin_log = self.top / "plugin.log"
        # Registered, and the kubelet's device manager watching (its ListAndWatch open): a pod
        # admitted before the manager has the list would be refused for want of the resource.
        registered_s = _wait(
            lambda: "the kubelet watches " in plugin_log.read_text(errors="replace"),
            30,
            "registration and ListAndWatch",
        )
        _wait(
            lambda: "kubelet_device_plugin_registration_total" in _get(f"{self.read_only}/metrics"),
            30,
            "the kubelet's registration metric",
        )
        return {
            "ok": True,
            "read_only": self.read_only,
            "gpu_nodes": nodes,
            "setup_s": round(time.monotonic() - began, 2),
            "kubelet_socket_s": round(socket_s, 2),
            "registered_s": round(registered_s, 2),
            "kubelet_began_monotonic": kubelet_began,
            "plugin_began_monotonic": plugin_began,
        }

    def pod(self, command: dict[str, Any]) -> dict[str, Any]:
        target = self.top / "manifests" / f"{command['name']}.json"
        temporary = target.with_suffix(".tmp")
        temporary.write_text(json.dumps(command["manifest"]))
        temporary.rename(target)  # whole, or the kubelet may read half a file
        return {"ok": True, "unix_ns": time.time_ns()}

    def teardown(self) -> dict[str, Any]:
        for name in ("plugin", "kubelet"):
            process = self.processes.pop(name, None)
            if process is not None:
                _stop(process)
        sock = self.top / "containerd" / "containerd.sock"
        if "containerd" in self.processes and sock.exists():
            ctr = ["ctr", "-a", str(sock), "-n", "k8s.io"]
            tasks = subprocess.run([*ctr, "tasks", "ls", "-q"], capture_output=True, text=True)
            for task in tasks.stdout.split():
                subprocess.run([*ctr, "tasks", "kill", "-s", "SIGKILL", task], capture_output=True)
            time.sleep(0.5)
        containerd = self.processes.pop("containerd", None)
        if containerd is not None:
            _stop(containerd)
        # runc's shims outlive containerd: each names our containerd's socket.
        for shim in psutil.process_iter(["cmdline"]):
            cmdline = shim.info["cmdline"] or []
            if "containerd-shim" in " ".join(cmdline[:1]) and str(sock) in cmdline:
                with contextlib.suppress(psutil.Error):
                    shim.kill()
        removed = 0
        for hierarchy in Path("/sys/fs/cgroup").iterdir():
            leftover = hierarchy / "k8s.io"
            if leftover.is_dir():
                for directory in sorted(leftover.rglob("*"), key=lambda p: -len(p.parts)):
                    if directory.is_dir():
                        with contextlib.suppress(OSError):
                            directory.rmdir()
                with contextlib.suppress(OSError):
                    leftover.rmdir()
                    removed += 1
        for log in self.logs:
            log.close()
        return {"ok": True, "cgroups_removed": removed}


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            data: bytes = answer.read()
    except OSError:
        return ""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data.decode(errors="replace")


def main() -> None:
    node = Node()
    for line in sys.stdin:
        command = json.loads(line)
        try:
            op = command.pop("op")
            if op == "setup":
                answer = node.setup(command)
            elif op == "pod":
                answer = node.pod(command)
            elif op == "teardown":
                answer = node.teardown()
            else:
                answer = {"error": f"unknown op {op!r}"}
        except Exception as error:
            answer = {"error": f"{type(error).__name__}: {error}"}
        sys.stdout.write("@@ " + json.dumps(answer) + "\n")
        sys.stdout.flush()
    node.teardown()


if __name__ == "__main__":
    main()

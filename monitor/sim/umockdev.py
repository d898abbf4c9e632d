"""Simulated GPUs through umockdev, for the tests and ``hotplug-monitor demo``: the driving side.

umockdev fakes sysfs, /dev and udev's netlink for any process run with its preload library, so
the daemon's real pyudev/libudev code sees these devices and their events exactly as real ones.
The testbed itself must be driven from a preloaded process too, so it lives in a small helper
(``python -m monitor.sim.testbed``) that takes one JSON command per line; ``Simulator`` runs it.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from typing import IO, Any

PRELOAD = "libumockdev-preload.so.0"
LIBRARY = "libumockdev.so.0"
INSTALL_HINT = (
    "umockdev is not installed; on Debian or Ubuntu, as root: apt-get install umockdev "
    "(it provides libumockdev.so.0 and libumockdev-preload.so.0)"
)


def umockdev_missing() -> str | None:
    """None when umockdev can be used here, else what to install."""
    try:
        ctypes.CDLL(LIBRARY)
        ctypes.CDLL(PRELOAD)
    except OSError:
        return INSTALL_HINT
    return None


def to_bytes(text: str) -> bytes:
    """Text to bytes; surrogate escapes (``to_text``) become the bytes that are not UTF-8."""
    return text.encode("utf-8", "surrogateescape")


def to_text(value: str | bytes) -> str:
    """Any bytes as text that survives JSON: what is not UTF-8 as surrogate escapes."""
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


class Simulator:
    """Simulated GPUs; ``daemon_env()`` is the environment a daemon needs to see them."""

    def __init__(self, helper: str = "monitor.sim.testbed") -> None:
        """``helper``: the module to run as the testbed's process (the benchmark has its own)."""
        missing = umockdev_missing()
        if missing:
            raise RuntimeError(missing)
        env = {**os.environ, "LD_PRELOAD": PRELOAD}
        env.pop("UMOCKDEV_DIR", None)
        self._process = subprocess.Popen(
            [sys.executable, "-m", helper],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        self.root = self._reply()["root"]

    def _reply(self) -> dict[str, Any]:
        stdout: IO[str] | None = self._process.stdout
        assert stdout is not None
        line = stdout.readline()
        if not line:
            raise RuntimeError("the umockdev helper exited")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def _do(self, op: str, **args: Any) -> dict[str, Any]:
        """Run one helper command; its reply."""
        stdin = self._process.stdin
        assert stdin is not None
        stdin.write(json.dumps({"op": op, **args}) + "\n")
        stdin.flush()
        reply = self._reply()
        if not reply["ok"]:
            raise RuntimeError(reply["error"])
        return reply

    def add(self, kind: str, address: str, numa_node: int = 0) -> None:
        self._do("add", kind=kind, address=address, numa_node=numa_node)

    def mig_nodes(self, gpu_minor: int) -> None:
        """Make the driver's MIG capability files for the NVIDIA GPU of minor ``gpu_minor``:
        /proc/driver/nvidia-caps/mig-minors and its /dev/nvidia-caps/nvidia-capN nodes."""
        self._do("mig_nodes", gpu_minor=gpu_minor)

    def remove(self, address: str) -> None:
        self._do("remove", address=address)

    def pci_error(self, address: str, event: str) -> None:
        self._do("pci_error", address=address, event=event)

    def wedge(self, address: str, method: str) -> None:
        self._do("wedge", address=address, method=method)

    def unbind(self, address: str) -> None:
        self._do("unbind", address=address)

    def bind(self, address: str) -> None:
        self._do("bind", address=address)

    def change(self, address: str) -> None:
        self._do("change", address=address)

    def set_stat(self, address: str, where: str, name: str, value: str | None) -> None:
        """Change one telemetry file (``SYSFS_STATS``) of a GPU; None removes it."""
        self._do("set_stat", address=address, where=where, name=name, value=value)

    def add_raw(
        self,
        subsystem: str,
        name: str | bytes,
        parent: str | None = None,
        attributes: Mapping[str, str | bytes] | None = None,
        properties: Mapping[str, str | bytes] | None = None,
    ) -> str:
        """Add a device with arbitrary (even malformed, non-UTF-8) data; its sys path."""
        path: str = self._do(
            "add_raw",
            subsystem=subsystem,
            name=to_text(name),
            parent=parent,
            attributes={k: to_text(v) for k, v in (attributes or {}).items()},
            properties={k: to_text(v) for k, v in (properties or {}).items()},
        )["result"]
        return path

    def uevent_raw(
        self, syspath: str, action: str, properties: Mapping[str, str | bytes] | None = None
    ) -> None:
        """Send ``action`` for the device at ``syspath`` with these one-off properties."""
        props = {k: to_text(v) for k, v in (properties or {}).items()}
        self._do("uevent_raw", syspath=syspath, action=action, properties=props)

    def set_raw(
        self,
        syspath: str,
        attributes: Mapping[str, str | bytes] | None = None,
        properties: Mapping[str, str | bytes] | None = None,
    ) -> None:
        """Change a device's attributes and properties without a uevent (for huge values)."""
        self._do(
            "set_raw",
            syspath=syspath,
            attributes={k: to_text(v) for k, v in (attributes or {}).items()},
            properties={k: to_text(v) for k, v in (properties or {}).items()},
        )

    def remove_raw(self, syspath: str) -> None:
        """Remove a device added with ``add_raw`` (and send its "remove" uevent)."""
        self._do("remove_raw", syspath=syspath)

    def daemon_env(self) -> dict[str, str]:
        return {**os.environ, "LD_PRELOAD": PRELOAD, "UMOCKDEV_DIR": self.root}

    def close(self) -> None:
        if self._process.stdin:
            self._process.stdin.close()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        if self._process.stdout:
            self._process.stdout.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Simulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

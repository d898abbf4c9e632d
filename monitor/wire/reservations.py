"""What a reservation may hand a container, checked by a client before it uses the answer.

The shapes are those the daemon plans (``monitor.core.plan``): a client checks what it got
against them before printing it for a shell or passing it to a container engine or scheduler,
so that a daemon it should not have trusted cannot run commands or expose host files.
"""

from __future__ import annotations

import re
from typing import Any


class BadAnswer(Exception):
    """The daemon answered with something no client should use; the message says what."""


ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
DEVICE_NODE = re.compile(
    r"/dev/(nvidia[0-9]{1,3}|nvidiactl|nvidia-uvm|nvidia-uvm-tools|nvidia-modeset|kfd"
    r"|nvidia-caps/nvidia-cap[0-9]{1,7}"  # a MIG instance's capability nodes
    r"|dri/(card|renderD)[0-9]{1,7})"
)
DEVICE_LINK = re.compile(
    r"/dev/dri/by-path/pci-[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]-(card|render)"
)
CGROUP_PERMS = re.compile(r"r?w?m?")
CDI_KIND = "hotplug-monitor.io/gpu"  # the daemon's CDI spec's kind: devices are KIND=ID
# With --cdi-publish leased the spec has this kind instead: one device per lease, KIND=LEASE_ID.
CDI_LEASE_KIND = "hotplug-monitor.io/lease"
CDI_DEVICE = re.compile(
    f"({re.escape(CDI_KIND)}|{re.escape(CDI_LEASE_KIND)})" + r"=[A-Za-z0-9:._-]{1,64}"
)


def cdi_name(device_id: str) -> str:
    """What a container engine is given for a device: ``hotplug-monitor.io/gpu=0000:3b:00.0``."""
    return f"{CDI_KIND}={device_id}"


def cdi_lease_name(reservation_id: str) -> str:
    """What a container engine is given for a whole lease when only leases are published."""
    return f"{CDI_LEASE_KIND}={reservation_id}"


_ID = re.compile(r"[A-Za-z0-9:._-]{1,64}")  # reservation and device IDs: safe to print anywhere


def check_reservation(result: Any) -> dict[str, Any]:
    """A ``reserve`` result whose every part has a shape the daemon plans; ``BadAnswer``
    naming the first that does not."""

    def bad(what: str, value: Any) -> BadAnswer:
        return BadAnswer(f"refusing the daemon's reservation: {what} {str(value)[:80]!r}")

    if not isinstance(result, dict):
        raise bad("not an object:", result)
    for text in [result.get("reservation_id"), *(result.get("device_ids") or [None])]:
        if not isinstance(text, str) or not _ID.fullmatch(text):
            raise bad("an unexpected ID", text)
    envs = result.get("envs")
    if not isinstance(envs, dict):
        raise bad("envs is not an object:", envs)
    for name, value in envs.items():
        if not ENV_NAME.fullmatch(name):
            raise bad("an environment variable name", name)
        if not isinstance(value, str) or not value.isprintable():
            raise bad(f"the value of {name}", value)
    for device in _list(result, "devices", bad):
        host, task, perms = (device.get(k) for k in ("host_path", "task_path", "cgroup_perms"))
        if not isinstance(host, str) or host != task or not DEVICE_NODE.fullmatch(host):
            raise bad("a device node", host)
        if not isinstance(perms, str) or not perms or not CGROUP_PERMS.fullmatch(perms):
            raise bad("cgroup permissions", perms)
    for name in result.get("cdi_devices", []):
        if not isinstance(name, str) or not CDI_DEVICE.fullmatch(name):
            raise bad("a CDI device name", name)
    for mount in _list(result, "mounts", bad):
        host, task = mount.get("host_path"), mount.get("task_path")
        if not isinstance(host, str) or host != task or not DEVICE_LINK.fullmatch(host):
            raise bad("a mount", host)
        if mount.get("read_only") is not True:
            raise bad("a writable mount of", host)
    return result


def _list(result: dict[str, Any], key: str, bad: Any) -> list[dict[str, Any]]:
    items = result.get(key)
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise bad(f"{key} is not a list of objects:", items)
    return items

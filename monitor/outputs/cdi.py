"""A Container Device Interface spec for the devices present, kept current on disk.

podman, containerd and CRI-O read CDI specs from ``/var/run/cdi`` (and ``/etc/cdi``), so with
this file ``--device hotplug-monitor.io/gpu=0000:3b:00.0`` (or ``=GPU-<uuid>``) gives a
container the device's nodes without asking the daemon. It bypasses leases: CDI has no notion
of them, which the README says.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import trio

from monitor.core.model import ContainerReservation
from monitor.core.plan import plan
from monitor.core.state import State
from monitor.outputs.files import write_atomically
from monitor.wire.framing import dumps
from monitor.wire.reservations import CDI_KIND

log = logging.getLogger(__name__)

KIND = CDI_KIND
# The newest version our edits need (hostPath on nodes, names starting with a digit), and the
# newest that podman 4.3 (Debian 12) still reads.
CDI_VERSION = "0.5.0"
FILE_NAME = "hotplug-monitor.json"


def container_edits(edits: ContainerReservation) -> dict[str, Any]:
    """Our container edits in CDI's form. NVIDIA_VISIBLE_DEVICES is left out: it names one
    device per spec entry, and a container given two would see only the last."""
    result: dict[str, Any] = {
        "deviceNodes": [
            {"path": d.task_path, "hostPath": d.host_path, "permissions": d.cgroup_perms}
            for d in edits.devices
        ]
    }
    if edits.mounts:
        result["mounts"] = [
            {
                "hostPath": m.host_path,
                "containerPath": m.task_path,
                "options": ["ro" if m.read_only else "rw", "nosuid", "nodev", "bind"],
            }
            for m in edits.mounts
        ]
    return result


def build_spec(state: State, exists: Callable[[str], bool] = os.path.exists) -> dict[str, Any]:
    """One CDI device per present device that has something to inject, named by PCI address,
    and again by GPU UUID. A device with no nodes (no driver bound, nodes not made yet, a
    virtio function) is left out: podman refuses a whole spec for one empty entry."""
    devices = []
    for address, (group, device) in sorted(state.fingerprint.devices().items()):
        if address not in state.devices:
            continue  # departed, shown only for its lease
        edits = plan([(group, device)], minor_of=state.nvidia_minor, exists=exists)
        if edits.empty:
            continue
        entry = container_edits(edits)
        devices.append({"name": address, "containerEdits": entry})
        uuid = device.attributes.get("uuid")
        if uuid is not None:
            devices.append({"name": str(uuid.value), "containerEdits": entry})
    return {"cdiVersion": CDI_VERSION, "kind": KIND, "devices": devices}


async def keep_spec(changes: AsyncIterator[State], directory: Path) -> None:
    """Rewrite ``directory/hotplug-monitor.json`` on every change; remove it when we stop."""
    path = directory / FILE_NAME
    written: bytes | None = None
    seen: tuple[Any, ...] | None = None
    try:
        async for state in changes:
            # What the spec is made of; leases and health, which change far more often, are not.
            inputs = (state.match_classes, state.devices, state.drm_nodes, state.nvml, state.names)
            if inputs == seen:
                continue
            seen = inputs
            content = dumps(build_spec(state)) + b"\n"
            if content != written:
                try:
                    await trio.to_thread.run_sync(_write, path, content)
                    written = content
                except OSError as exc:
                    log.error("cannot write the CDI spec %s: %s", path, exc.strerror or exc)
    finally:
        if written is not None:
            path.unlink(missing_ok=True)


def _write(path: Path, content: bytes) -> None:
    write_atomically(path, content, mode=0o644)

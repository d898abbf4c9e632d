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
COALESCE_SECONDS = 0.05


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


def spec_inputs(state: State) -> tuple[Any, ...]:
    """What the spec is made of. Leases and health, which change far more often, are not; and
    as the draft keeps unchanged fields as they were, comparing these is mostly identity."""
    return (state.match_classes, state.devices, state.drm_nodes, state.nvml, state.names)


class CdiSpec:
    """The spec file in ``directory``, written by ``keep`` after each change of the devices, and
    which state it was written for, so that a reservation's answer can wait for its devices'
    entries before it names them.

    A change is written ``COALESCE_SECONDS`` after it is seen: the subscribers hear of it first
    (the spec is not what a hot-add waits on), and a burst of changes is one write."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / FILE_NAME
        self._written: tuple[Any, ...] | None = None  # spec_inputs of the spec on disk
        self._content: bytes | None = None  # the spec on disk, as written
        self._generation = -1  # the newest state the spec on disk is current for
        self._caught_up = trio.Event()  # set, and replaced, each time the spec catches up
        self._stopped = False

    def is_current(self, state: State) -> bool:
        return (
            self._stopped
            or self._generation >= state.generation
            or self._written == spec_inputs(state)
        )

    async def wait_until_current(self, state: State) -> None:
        """Until the spec on disk holds ``state``'s devices (or a later state's)."""
        while not self.is_current(state):
            await self._caught_up.wait()

    async def keep(self, changes: AsyncIterator[State], latest: Callable[[], State]) -> None:
        """Write the spec whenever the devices change; remove it when we stop."""
        try:
            async for state in changes:
                if spec_inputs(state) != self._written:
                    await trio.sleep(COALESCE_SECONDS)
                    state = latest()
                    await self._write(state)
                self._generation = max(self._generation, state.generation)
                self._caught_up.set()
                self._caught_up = trio.Event()
        finally:
            self._stopped = True
            self._caught_up.set()
            if self._written is not None:
                self.path.unlink(missing_ok=True)

    async def _write(self, state: State) -> None:
        inputs = spec_inputs(state)
        content = dumps(build_spec(state)) + b"\n"
        # The same spec is not written again: a change of a device it does not name (a NIC's
        # uevent) would wake every container engine watching the directory for nothing.
        if content != self._content:
            try:
                # A runtime file, made again at every start: atomic, but not worth an fsync.
                await trio.to_thread.run_sync(write_atomically, self.path, content, 0o644, False)
            except OSError as exc:
                log.error("cannot write the CDI spec %s: %s", self.path, exc.strerror or exc)
            else:
                self._content = content
        self._written = inputs  # or given up on: a reservation does not wait on a broken disk

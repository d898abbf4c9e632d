"""A Container Device Interface spec, kept current on disk, in one of two publish modes.

podman, containerd and CRI-O read CDI specs from ``/var/run/cdi`` (and ``/etc/cdi``) without
asking the daemon. ``all``: every present device, so ``--device
hotplug-monitor.io/gpu=0000:3b:00.0`` (or ``=GPU-<uuid>``) gives a container the device's nodes
whoever holds it. ``leased``: only leases, one CDI device each named after its reservation ID
(``hotplug-monitor.io/lease=<id>``) with all its devices' edits, so that the spec cannot be used
to go around a lease: a device nobody leased is in no entry, and a lease's entry leaves the
spec before ``release`` answers (and when the lease expires or its devices are revoked).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import trio

from monitor.core.leases import Lease
from monitor.core.mig import MIG_TYPE
from monitor.core.model import ContainerReservation
from monitor.core.plan import plan
from monitor.core.state import State
from monitor.outputs.files import write_atomically
from monitor.wire.framing import dumps
from monitor.wire.reservations import CDI_KIND, CDI_LEASE_KIND, cdi_lease_name

log = logging.getLogger(__name__)

KIND = CDI_KIND
# The newest version our edits need (hostPath on nodes, names starting with a digit), and the
# newest that podman 4.3 (Debian 12) still reads.
CDI_VERSION = "0.5.0"
FILE_NAME = "hotplug-monitor.json"
COALESCE_SECONDS = 0.05
# CDI's rule for a device name (its parser's ValidateDeviceName): a lease ID that breaks it
# (possible only in a hand-edited lease file) would make podman refuse the whole spec.
CDI_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.:-]*[A-Za-z0-9])?")


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
    virtio function) is left out: podman refuses a whole spec for one empty entry.

    A shared device's replicas each have an entry with the device's edits, named by replica ID,
    beside the device's own (by address and UUID): this mode hands a device to whoever names
    it, held or not, and a replica's holder names its replica.

    A MIG device has one entry, named by its MIG UUID, with its GPU's node and its own
    capability nodes: its GPU's address and UUID name the GPU, which is not shown then."""
    devices = []
    named: set[str] = set()
    for device_id, (group, device) in sorted(state.fingerprint.devices().items()):
        address = device.hw_locality.pci_bus_id
        if address not in state.devices:
            continue  # departed, shown only for its lease
        edits = plan([(group, device)], minor_of=state.nvidia_minor, exists=exists)
        if edits.empty:
            continue
        entry = container_edits(edits)
        uuid = device.attributes.get("uuid")
        names: list[str | None] = [device_id]
        if group.type != MIG_TYPE:
            names += [address, str(uuid.value) if uuid is not None else None]
        for name in names:
            if name is not None and name not in named:
                named.add(name)
                devices.append({"name": name, "containerEdits": entry})
    return {"cdiVersion": CDI_VERSION, "kind": KIND, "devices": devices}


def lease_edits(
    state: State, lease: Lease, exists: Callable[[str], bool] = os.path.exists
) -> ContainerReservation | None:
    """The edits of a lease's CDI device, or None when the lease has none: a device of it is
    gone or not healthy (revoked: the lease stays, so that its holder learns why, but no new
    container gets the device through it), or has nothing to inject (the container would
    silently lack a device it was given, as ``reserve --cdi`` refuses to let happen)."""
    if not CDI_NAME.fullmatch(lease.id):
        return None
    shown = state.fingerprint.devices()
    chosen = []
    for device_id in lease.devices:
        found = shown.get(device_id)
        present = found is not None and found[1].hw_locality.pci_bus_id in state.devices
        if not present or found is None or not found[1].healthy:
            return None
        if plan([found], minor_of=state.nvidia_minor, exists=exists).empty:
            return None
        chosen.append(found)
    return plan(chosen, minor_of=state.nvidia_minor, exists=exists)


def build_lease_spec(
    state: State, exists: Callable[[str], bool] = os.path.exists
) -> dict[str, Any]:
    """One CDI device per lease that has edits (``lease_edits``), named by its reservation ID.
    With no such lease the spec names no device (an empty list is valid CDI)."""
    devices = []
    for lease_id, lease in sorted(state.leases.items()):
        edits = lease_edits(state, lease, exists)
        if edits is not None:
            devices.append({"name": lease_id, "containerEdits": container_edits(edits)})
    return {"cdiVersion": CDI_VERSION, "kind": CDI_LEASE_KIND, "devices": devices}


def spec_inputs(state: State) -> tuple[Any, ...]:
    """What the spec of every device is made of. Leases and health, which change far more
    often, are not; and as the draft keeps unchanged fields as they were, comparing these is
    mostly identity."""
    return (
        state.match_classes,
        state.devices,
        state.drm_nodes,
        state.nvml,
        state.names,
        state.mig,
        state.mig_minors,
    )


def lease_spec_inputs(state: State) -> tuple[Any, ...]:
    """What the spec of leases is made of: the devices, and the leases and health (the
    fingerprint shows both)."""
    return (*spec_inputs(state), state.leases, state.fingerprint)


class CdiSpec:
    """The spec file in ``directory``, written by ``keep`` after each change of what it is made
    of, and which state it was written for, so that a reservation's answer can wait for its
    entries before it names them (and, of leases, a release's answer for the entry to go).

    A change of the devices is written ``COALESCE_SECONDS`` after it is seen: the subscribers
    hear of it first (the spec is not what a hot-add waits on), and a burst of changes is one
    write. A change of leases alone is written at once, since a request waits on it; requests
    that come during a write are one write after it (``changes`` gives the newest state)."""

    def __init__(self, directory: Path, *, leased: bool = False) -> None:
        self.path = directory / FILE_NAME
        self.leased = leased  # publish leases (``--cdi-publish leased``), not every device
        self._inputs = lease_spec_inputs if self.leased else spec_inputs
        self._build = build_lease_spec if self.leased else build_spec
        self.published: frozenset[str] = frozenset()  # the lease IDs named by the spec on disk
        self._written: tuple[Any, ...] | None = None  # inputs of the spec on disk
        self._devices: tuple[Any, ...] | None = None  # and of its devices (spec_inputs)
        self._content: bytes | None = None  # what the spec on disk holds
        self._generation = -1  # the newest state the spec on disk is current for
        self._caught_up = trio.Event()  # set, and replaced, each time the spec catches up
        self._stopped = False

    def is_current(self, state: State) -> bool:
        return (
            self._stopped
            or self._generation >= state.generation
            or self._written == self._inputs(state)
        )

    def lease_names(self, lease_id: str) -> list[str]:
        """The lease's CDI name if the spec on disk has it (call once it is current)."""
        return [cdi_lease_name(lease_id)] if lease_id in self.published else []

    async def wait_until_current(self, state: State) -> None:
        """Until the spec on disk holds ``state``'s devices (or a later state's)."""
        while not self.is_current(state):
            await self._caught_up.wait()

    async def keep(self, changes: AsyncIterator[State], latest: Callable[[], State]) -> None:
        """Write the spec whenever what it is made of changes; remove it when we stop."""
        try:
            async for state in changes:
                inputs = self._inputs(state)
                if inputs != self._written:
                    if spec_inputs(state) != self._devices:
                        await trio.sleep(COALESCE_SECONDS)  # the devices changed
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
        inputs = self._inputs(state)
        spec = self._build(state)
        content = dumps(spec) + b"\n"
        if content != self._content:  # a health or lease change that changes no entry
            try:
                # A runtime file, made again at every start: atomic, but not worth an fsync.
                await trio.to_thread.run_sync(write_atomically, self.path, content, 0o644, False)
                self._content = content
                self.published = frozenset(d["name"] for d in spec["devices"])
            except OSError as exc:
                log.error("cannot write the CDI spec %s: %s", self.path, exc.strerror or exc)
        self._devices = spec_inputs(state)
        self._written = inputs  # or given up on: a reservation does not wait on a broken disk

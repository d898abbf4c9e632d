"""The one place that decides what an event means.

``fold(state, events)`` is pure and synchronous: no I/O, no trio, no clock. The state keeps the
raw facts (every PCI function, every DRM node, what NVML says of each NVIDIA GPU, the health
problems per device and cause, the leases) and the fingerprint derived from them
(``monitor.core.fingerprint``); the patch is the RFC 7386 merge patch that turns the old
fingerprint's JSON into the new one, or ``None`` when nothing a client can see changed. The
generation grows only with a patch.

Recovery needs evidence, and each piece of evidence clears the causes it speaks for
(``monitor.core.health``): a removed device takes its problems with it; a driver rebind clears a DRM
wedge and every NVIDIA cause; a PCI ``SUCCESSFUL_RECOVERY`` clears PCI and XID errors; NVML's
recovery action "none" clears XID errors; NVML answering again clears "not responding".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import attrs

from monitor.core.events import (
    ClassFilterChanged,
    ConnectionClosed,
    DeviceGone,
    DeviceSeen,
    DrmNode,
    DrmNodeGone,
    DrmNodeSeen,
    DrmWedged,
    Event,
    LeaseEnded,
    NvmlEventReported,
    NvmlGpu,
    NvmlGpuSeen,
    NvmlReachable,
    NvmlUnreachable,
    PciErrorReported,
    PciFacts,
    ReleaseRequested,
    ReserveRequested,
    Resync,
    XidPolicyChanged,
    XidReported,
)
from monitor.core.fingerprint import (
    DEFAULT_MATCH_CLASSES,
    Patch,
    build_fingerprint,
    fingerprint_patch,
)
from monitor.core.health import (
    CAUSE_DRM_WEDGED,
    CAUSE_NVML,
    CAUSE_PCI_ERROR,
    CAUSE_RECOVERY_ACTION,
    CAUSE_XID,
    NVIDIA_CAUSES,
    Problem,
    Problems,
    frozen_problems,
)
from monitor.core.leases import Lease
from monitor.core.model import Fingerprint, frozen_mapping
from monitor.core.plan import check_healthy, device_index, resolve
from monitor.core.xids import REBOOT, RESET, XidPolicy, judge
from monitor.wire.protocol import DEVICE_RESERVED, INVALID_PARAMS, PERMISSION_DENIED, RpcError

# NVML's recovery actions (nvmlDeviceGpuRecoveryAction_t), as a person would say them.
RECOVERY_ACTIONS = {
    1: "reset the GPU",
    2: "reboot the node",
    3: "drain peer-to-peer traffic",
    4: "drain work, then reset the GPU",
}


@attrs.frozen
class State:
    generation: int = 0
    match_classes: tuple[str, ...] = DEFAULT_MATCH_CLASSES
    devices: Mapping[str, PciFacts] = attrs.field(converter=frozen_mapping, factory=dict)
    drm_nodes: Mapping[str, DrmNode] = attrs.field(converter=frozen_mapping, factory=dict)
    problems: Mapping[str, Problems] = attrs.field(converter=frozen_problems, factory=dict)
    leases: Mapping[str, Lease] = attrs.field(converter=frozen_mapping, factory=dict)
    nvml: Mapping[str, NvmlGpu] = attrs.field(converter=frozen_mapping, factory=dict)
    xids: Mapping[str, tuple[int, int]] = attrs.field(  # address -> (last XID, count)
        converter=frozen_mapping, factory=dict
    )
    xid_policy: XidPolicy = attrs.field(factory=XidPolicy)
    # what cleared a device's problems in the fold that made this state, for the journal
    recoveries: Mapping[str, str] = attrs.field(converter=frozen_mapping, factory=dict)
    fingerprint: Fingerprint = attrs.field(factory=Fingerprint)

    def nvidia_minor(self, address: str) -> int | None:
        """N of the GPU's /dev/nvidiaN: the driver's proc file says, else NVML, else unknown."""
        facts = self.devices.get(address)
        if facts is not None and facts.nvidia_minor is not None:
            return facts.nvidia_minor
        gpu = self.nvml.get(address)
        return gpu.minor if gpu is not None else None


Answer = Lease | list[str] | RpcError  # a granted lease, the devices released, or a refusal


@attrs.frozen
class Reduction:
    state: State
    patch: Patch | None
    # per request: ReserveRequested by its lease ID, ReleaseRequested by its token
    answers: Mapping[str | int, Answer] = attrs.field(factory=dict)


def reduce(state: State, event: Event) -> tuple[State, Patch | None]:
    """Fold one event into the state."""
    return reduce_all(state, (event,))


def reduce_all(state: State, events: Iterable[Event]) -> tuple[State, Patch | None]:
    """Fold a batch of events into the state, with one patch (and generation) for all of them."""
    reduction = fold(state, events)
    return reduction.state, reduction.patch


def fold(state: State, events: Iterable[Event]) -> Reduction:
    """Fold a batch of events, requests among them, into one state and one patch.

    Each request is decided against the devices and leases as the events before it left them,
    so requests in one batch are decided one after the other, as if they came one by one.
    """
    scratch = _Scratch(state)
    for event in events:
        scratch.apply(event)
    if not scratch.changed:
        return Reduction(state, None, scratch.answers)
    fingerprint = scratch.fingerprint()
    patch = fingerprint_patch(state.fingerprint, fingerprint)
    new = State(
        generation=state.generation + (patch is not None),
        match_classes=scratch.match_classes,
        devices=scratch.devices,
        drm_nodes=scratch.drm_nodes,
        problems=scratch.problems,
        leases=scratch.leases,
        nvml=scratch.nvml,
        xids=scratch.xids,
        xid_policy=scratch.xid_policy,
        recoveries=scratch.recoveries,
        fingerprint=fingerprint,
    )
    return Reduction(new, patch, scratch.answers)


class _Scratch:
    """Mutable working copies of one state's facts, private to one ``fold`` call."""

    def __init__(self, state: State) -> None:
        self.match_classes = state.match_classes
        self.devices = dict(state.devices)
        self.drm_nodes = dict(state.drm_nodes)
        self.problems = {k: dict(v) for k, v in state.problems.items()}
        self.leases = dict(state.leases)
        self.nvml = dict(state.nvml)
        self.xids = dict(state.xids)
        self.xid_policy = state.xid_policy
        self.recoveries: dict[str, str] = {}
        self.answers: dict[str | int, Answer] = {}
        self.changed = False
        self._base = state.fingerprint
        self._built: Fingerprint | None = state.fingerprint
        self._dirty: set[str] | None = set()  # devices changed since the base; None: any

    def _touch(self, *addresses: str) -> None:
        """Something changed: for these devices only, or (none named) for any."""
        self.changed = True
        self._built = None
        if not addresses:
            self._dirty = None
        elif self._dirty is not None:
            self._dirty.update(addresses)

    def fingerprint(self) -> Fingerprint:
        """The fingerprint of the facts as they are now, built at most once per change, from
        the devices that changed and the unchanged rest of the fold's first fingerprint."""
        if self._built is None:
            self._built = build_fingerprint(self, self._base, self._dirty)
        return self._built

    def apply(self, event: Event) -> None:
        match event:
            case DeviceSeen(facts):
                self._seen(facts)
            case DeviceGone(address):
                self._gone(address)
            case DrmNodeSeen(node):
                old = self.drm_nodes.get(node.name)
                if old != node:
                    self.drm_nodes[node.name] = node
                    self._touch(node.parent, *([old.parent] if old else []))
            case DrmNodeGone(name):
                gone = self.drm_nodes.pop(name, None)
                if gone is not None:
                    self._touch(gone.parent)
            case PciErrorReported(address, error_event, online):
                if address in self.devices:
                    self._pci_error(address, error_event, online)
            case DrmWedged(name, method):
                wedged = self.drm_nodes.get(name)
                if wedged is not None and wedged.parent in self.devices:
                    if method == "none":
                        reason = f"the driver reports {name} working again"
                        self._clear(wedged.parent, (CAUSE_DRM_WEDGED,), reason)
                    else:
                        desc = f"DRM device {name} is wedged; recovery needs: {method}"
                        problem = Problem(desc, recovery_action=method)
                        self._set(wedged.parent, CAUSE_DRM_WEDGED, problem)
            case Resync(devices, drm_nodes):
                present = {f.address for f in devices}
                for address in [a for a in self.devices if a not in present]:
                    self._gone(address)
                for facts in devices:
                    self._seen(facts)
                nodes = {n.name: n for n in drm_nodes}
                if nodes != self.drm_nodes:
                    self.drm_nodes = nodes
                    self._touch()
            case ClassFilterChanged(match_classes):
                if match_classes != self.match_classes:
                    self.match_classes = match_classes
                    self._touch()
            case NvmlGpuSeen(gpu):
                if gpu.address in self.devices and self.nvml.get(gpu.address) != gpu:
                    self.nvml[gpu.address] = gpu
                    self._touch(gpu.address)
            case XidReported(address, xid):
                if address in self.devices:
                    self._xid(address, xid)
            case NvmlEventReported(address, kind, action):
                if address in self.devices:
                    self._nvml_event(address, kind, action)
            case NvmlUnreachable(address, reason, lost):
                if address in self.devices:
                    problem = Problem(reason, lost=lost, recovery_action=REBOOT if lost else None)
                    self._set(address, CAUSE_NVML, problem)
            case NvmlReachable(address):
                self._clear(address, (CAUSE_NVML,), "NVML answers for it again")
            case XidPolicyChanged(policy):
                self._xid_policy(policy)
            case ReserveRequested(device_ids, lease):
                try:
                    self.answers[lease.id] = self._reserve(device_ids, lease)
                except RpcError as refusal:
                    self.answers[lease.id] = refusal
            case ReleaseRequested(token, uid, lease_id, device_ids):
                try:
                    self.answers[token] = self._release(uid, lease_id, device_ids)
                except RpcError as refusal:
                    self.answers[token] = refusal
            case LeaseEnded(lease_id):
                ended = self.leases.pop(lease_id, None)
                if ended is not None:
                    self._touch(*ended.devices)
            case ConnectionClosed(connection):
                for lease in [le for le in self.leases.values() if le.connection == connection]:
                    del self.leases[lease.id]
                    self._touch(*lease.devices)

    def _reserve(self, device_ids: tuple[str, ...], lease: Lease) -> Lease:
        """All the devices or none: each known, healthy and held by no other lease."""
        wanted = resolve(self.fingerprint(), device_ids)
        check_healthy(wanted)
        holders = {d.id: d.reserved_by for _, d in wanted if d.reserved_by is not None}
        if holders:
            held = {
                device_id: self.leases[lease_id].holder_json()
                for device_id, lease_id in holders.items()
            }
            raise RpcError(
                DEVICE_RESERVED,
                "Already reserved: "
                + "; ".join(f"{d} by {lease_id}" for d, lease_id in holders.items())
                + ".",
                {"device_ids": list(holders), "holders": held},
            )
        granted = attrs.evolve(lease, devices={d.id: g.key for g, d in wanted})
        self.leases[granted.id] = granted
        self._touch(*granted.devices)
        return granted

    def _release(self, uid: int, lease_id: str | None, device_ids: tuple[str, ...]) -> list[str]:
        """Release a lease, or devices from their leases; only the lease's uid or root may."""
        if lease_id is not None:
            lease = self.leases.get(lease_id)
            if lease is None:
                raise RpcError(
                    INVALID_PARAMS,
                    f"No reservation {lease_id} is held.",
                    {"reservation_id": lease_id},
                )
            affected = {lease.id: set(lease.devices)}
        else:
            index = device_index(self.fingerprint())
            wanted = {index[i][1].id if i in index else i.lower() for i in device_ids}
            affected = {
                held.id: wanted & set(held.devices)
                for held in self.leases.values()
                if wanted & set(held.devices)
            }
        refused = [i for i in affected if uid not in (0, self.leases[i].uid)]
        if refused:
            raise RpcError(
                PERMISSION_DENIED,
                "Only the user who made a reservation, or root, may release it: "
                + ", ".join(refused)
                + ".",
                {"reservation_ids": refused},
            )
        released: list[str] = []
        for held_id, devices in affected.items():
            lease = self.leases[held_id]
            released.extend(d for d in lease.devices if d in devices)
            kept = {d: g for d, g in lease.devices.items() if d not in devices}
            if kept:
                self.leases[held_id] = attrs.evolve(lease, devices=kept)
            else:
                del self.leases[held_id]
            self._touch(*lease.devices)
        return released

    def _seen(self, facts: PciFacts) -> None:
        old = self.devices.get(facts.address)
        if old == facts:
            return
        self.devices[facts.address] = facts
        self._touch(facts.address)
        if old is not None and old.driver != facts.driver and facts.driver is not None:
            causes = (CAUSE_DRM_WEDGED, *NVIDIA_CAUSES)
            self._clear(facts.address, causes, "its driver was rebound")

    def _gone(self, address: str) -> None:
        if self.devices.pop(address, None) is None:
            return
        self._touch(address)
        self.problems.pop(address, None)
        self.nvml.pop(address, None)
        self.xids.pop(address, None)
        for name in [n for n, node in self.drm_nodes.items() if node.parent == address]:
            del self.drm_nodes[name]

    def _pci_error(self, address: str, error_event: str | None, online: bool | None) -> None:
        if error_event == "SUCCESSFUL_RECOVERY" or (error_event is None and online):
            causes = (CAUSE_PCI_ERROR, CAUSE_XID, CAUSE_RECOVERY_ACTION)
            self._clear(address, causes, "the kernel reported a successful PCI error recovery")
        elif error_event == "BEGIN_RECOVERY":
            desc = "PCI error: recovery in progress, device offline"
            self._set(address, CAUSE_PCI_ERROR, Problem(desc))
        elif error_event == "FAILED_RECOVERY":
            desc = "PCI error: recovery failed, device offline until it is reset or replaced"
            problem = Problem(desc, lost=True, recovery_action="reset or replace the device")
            self._set(address, CAUSE_PCI_ERROR, problem)
        elif error_event is not None:
            self._set(address, CAUSE_PCI_ERROR, Problem(f"PCI error event {error_event}"))
        elif online is False:
            self._set(address, CAUSE_PCI_ERROR, Problem("PCI device reported offline"))

    def _xid(self, address: str, xid: int) -> None:
        _, count = self.xids.get(address, (0, 0))
        self.xids[address] = (xid, count + 1)
        self._touch(address)
        verdict = judge(xid, self.xid_policy)
        if verdict.fatal:
            problem = Problem(verdict.desc, verdict.lost, verdict.recovery_action, xid)
            self._set(address, CAUSE_XID, problem)

    def _nvml_event(self, address: str, kind: str, action: int | None) -> None:
        if kind == "double_bit_ecc":
            problem = Problem(f"double-bit ECC error; recovery: {RESET}", recovery_action=RESET)
            self._set(address, CAUSE_XID, problem)
        elif kind == "gpu_unavailable":
            desc = f"NVML reports the GPU unavailable; recovery: {RESET}"
            self._set(address, CAUSE_NVML, Problem(desc, lost=True, recovery_action=RESET))
        elif kind == "recovery_action" and not action:
            reason = "NVML reports it usable again (recovery action: none)"
            self._clear(address, (CAUSE_XID, CAUSE_RECOVERY_ACTION), reason)
        elif kind == "recovery_action" and action is not None:
            needed = RECOVERY_ACTIONS.get(action, f"recovery action {action}")
            problem = Problem(f"NVML asks to {needed}", recovery_action=needed)
            self._set(address, CAUSE_RECOVERY_ACTION, problem)

    def _xid_policy(self, policy: XidPolicy) -> None:
        """Adopt a new policy, and judge the XIDs that made devices unhealthy again by it."""
        self.xid_policy = policy
        for address, causes in list(self.problems.items()):
            problem = causes.get(CAUSE_XID)
            if problem is None or problem.xid is None:
                continue
            verdict = judge(problem.xid, policy)
            if verdict.fatal:
                again = Problem(verdict.desc, verdict.lost, verdict.recovery_action, problem.xid)
                self._set(address, CAUSE_XID, again)
            else:
                self._clear(
                    address, (CAUSE_XID,), f"the XID policy no longer counts XID {problem.xid}"
                )

    def _set(self, address: str, cause: str, problem: Problem) -> None:
        causes = self.problems.setdefault(address, {})
        if causes.get(cause) != problem:
            causes[cause] = problem
            self._touch(address)

    def _clear(self, address: str, causes: Iterable[str], reason: str) -> None:
        """Clear these causes; ``reason`` is the evidence, which the journal will name."""
        found = self.problems.get(address)
        cleared = [c for c in causes if found and found.pop(c, None) is not None]
        if cleared:
            self._touch(address)
            self.recoveries[address] = reason

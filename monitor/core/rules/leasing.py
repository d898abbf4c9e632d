"""Leases: who may hold which devices, and when a lease ends.

A lease is exclusive: every device asked for is known, healthy and held by no other lease, or
the request gets none of them. Who asks is the peer the kernel saw; root, the daemon's user and
members of its group may reserve and release (the read-only group's members may not), and only a
lease's own user (or root) may release it. A lease ends when released, when its holder process
exits, or when its connection closes.

Schedulers allocate and never release (Nomad reserves at each task start; kubelet tracks its
pods itself), so a lease may have an owner, a scheduler's name. An owner's lease ends only by
release, by the owner's reconcile (the devices it still uses: its leases on the others end), or
by an operator. An owner name belongs to identities (``monitor.core.access``): only they or root
reserve, release or reconcile under it. A reserve by owner X of devices X already holds replaces
X's lease on them: the scheduler decides among its own tasks.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from monitor.core.access import Access, Peer, may_use_owner, owner_belongs_to
from monitor.core.answers import Answer, Grant, Reason, Refusal, Released
from monitor.core.draft import Draft, RequestRule, Rule
from monitor.core.events import (
    ConnectionClosed,
    LeaseEnded,
    ReconcileRequested,
    ReleaseRequested,
    ReserveRequested,
)
from monitor.core.leases import Lease, LeaseChange
from monitor.core.model import Device, DeviceGroup, Fingerprint
from monitor.core.pci import class_matches, class_phrase
from monitor.core.plan import with_edits
from monitor.core.replicas import split
from monitor.core.rules.mig_reserve import mig_blocked, mig_refusal, mig_whole
from monitor.core.rules.sharing import one_per_device, shared_whole
from monitor.core.state import F, State, nvidia_minor

Found = tuple[DeviceGroup, Device]


def may_reserve(access: Access, peer: Peer, holder_pid: int | None = None) -> Refusal | None:
    """Whether ``peer`` may reserve, naming ``holder_pid`` as the lease's holder; the serving
    layer asks this before it looks the holder up, so that outsiders learn nothing of PIDs."""
    refusal = may_change(access, peer, "reserve")
    if refusal is None and holder_pid is not None and not peer.in_our_pid_namespace:
        return Refusal(
            Reason.INVALID,
            "holder_pid is refused from a client in another PID namespace (a container): "
            "its process IDs are not this host's.",
            {"holder_pid": holder_pid},
        )
    return refusal


def may_change(access: Access, peer: Peer, action: str) -> Refusal | None:
    if access.may_change(peer):
        return None
    if access.read_only(peer):
        return Refusal(
            Reason.FORBIDDEN,
            f"uid {peer.uid} is in the daemon's read-only group: it may read devices, leases "
            f"and stats, but not {action}.",
            {"uid": peer.uid},
        )
    return Refusal(
        Reason.FORBIDDEN,
        f"Only root and members of the daemon's group may {action} devices "
        f"(you are uid {peer.uid}).",
        {"uid": peer.uid},
    )


def may_own(draft: Draft, peer: Peer, owner: str, action: str) -> Refusal | None:
    """Whether ``peer`` may ``action`` under the owner name ``owner``."""
    access, leases = draft.get(F.access), draft.get(F.leases).values()
    if may_use_owner(access, leases, peer, owner):
        return None
    return Refusal(
        Reason.FORBIDDEN,
        f"The owner name {owner} belongs to {owner_belongs_to(access, leases, owner)}; "
        f"uid {peer.uid} may not {action} under it.",
        {"owner": owner, "uid": peer.uid},
    )


def device_index(fingerprint: Fingerprint) -> dict[str, Found]:
    """Every device by PCI address (or replica ID) and, where it has one, by GPU UUID: an ID
    names one device, and a PCI address first. A replica is not named by its GPU's UUID: that
    names the GPU, which is not leased whole once shared."""
    index = dict(fingerprint.devices())
    for group, device in fingerprint.devices().values():
        uuid = device.attributes.get("uuid")
        if uuid is not None and split(device.id)[1] is None:
            index.setdefault(str(uuid.value), (group, device))
    return index


def _why_not_shown(state: State, device_id: str) -> str | None:
    """Why a device of this host is not shown, when it is one."""
    shared = shared_whole(state, device_id) or mig_whole(state, device_id)
    if shared is not None:
        return shared[0]
    blocked = mig_blocked(state, device_id)
    if blocked is not None:
        return blocked
    facts = state.devices.get(device_id.lower())
    if facts is None:
        return None
    if facts.address in state.naming:
        return f"{device_id} is not shown yet: it waits for NVML to name it"
    if not class_matches(facts.pci_class, state.match_classes):
        return (
            f"{device_id} is not followed: it is {class_phrase(facts.pci_class)} (class "
            f"0x{facts.pci_class:06x}), which serve --match-class 0x{facts.pci_class >> 16:02x} "
            "would follow"
        )
    return None


def resolve(draft: Draft, device_ids: Iterable[str]) -> list[Found] | Refusal:
    """The devices these IDs (PCI addresses or GPU UUIDs) name; unknown IDs are refused, with
    the reason a device of this host is not shown where there is one."""
    index = device_index(draft.fingerprint())
    found: list[Found] = []
    unknown: list[str] = []
    for wanted in device_ids:
        hit = index.get(wanted) or index.get(wanted.lower())
        if hit is None:
            unknown.append(wanted)
        elif hit not in found:
            found.append(hit)
    if not unknown:
        return found
    state = draft.state()
    hidden = {i: why for i in unknown if (why := _why_not_shown(state, i)) is not None}
    sentences = [f"{why}." for why in hidden.values()]
    missing = [i for i in unknown if i not in hidden]
    if missing:
        sentences.insert(0, f"No such device on this host: {', '.join(missing)}.")
    data: dict[str, object] = {"device_ids": unknown}
    replicas = {i: shared[1] for i in hidden if (shared := shared_whole(state, i)) is not None}
    if replicas:
        data["replicas"] = replicas
    parts = {i: mig[1] for i in hidden if (mig := mig_whole(state, i)) is not None}
    if parts:
        data["mig_instances"] = parts
    return Refusal(Reason.UNKNOWN_DEVICE, " ".join(sentences), data)


def reserve(draft: Draft, request: ReserveRequested) -> Answer:
    peer = request.peer
    holder_pid = request.holder.pid if request.holder is not None else None
    refusal = may_reserve(draft.get(F.access), peer, holder_pid)
    if refusal is None and request.owner is not None:
        refusal = may_own(draft, peer, request.owner, "reserve")
    if refusal is not None:
        return refusal
    found = resolve(draft, request.device_ids)
    if isinstance(found, Refusal):
        return found
    refusal = one_per_device(draft.get(F.share), found) or mig_refusal(draft.state(), found)
    if refusal is not None:
        return refusal
    unhealthy = {d.id: d.health_desc for _, d in found if not d.healthy}
    if unhealthy:
        names = "; ".join(f"{i}: {desc}" for i, desc in unhealthy.items())
        return Refusal(
            Reason.UNHEALTHY,
            f"Refusing unhealthy devices ({names}).",
            {"device_ids": list(unhealthy), "health": unhealthy},
        )
    owner = request.owner
    if owner is not None and (request.holder is not None or request.connection is not None):
        return Refusal(
            Reason.INVALID,
            "An owner's lease ends only by release or reconcile: give no holder_pid or bind.",
        )
    leases = draft.get(F.leases)
    held = {
        d.id: d.reserved_by
        for _, d in found
        if d.reserved_by is not None and (owner is None or leases[d.reserved_by].owner != owner)
    }
    if held:
        return Refusal(
            Reason.RESERVED,
            "Already reserved: " + "; ".join(f"{d} by {i}" for d, i in held.items()) + ".",
            {
                "device_ids": list(held),
                "holders": {d: leases[i].holder_json() for d, i in held.items()},
            },
        )
    facts, nvml = draft.get(F.devices), draft.get(F.nvml)
    # a replica's nodes are its device's, a MIG device's its GPU's: where it is
    bases = {d.hw_locality.pci_bus_id for _, d in found}
    minors = {b: m for b in bases if (m := nvidia_minor(facts, nvml, b)) is not None}
    if request.cdi_nodes is not None:  # refused before any lease flickers through consumers
        named = with_edits(found, minor_of=minors.get, exists=request.cdi_nodes.__contains__)
        nothing = [d.id for _, d in found if d.id not in named]
        if nothing:
            return Refusal(
                Reason.INVALID,
                f"{', '.join(nothing)} has nothing a container engine could be given (no "
                "device nodes), so no CDI device names it.",
                {"device_ids": nothing},
            )
    lease = Lease(
        id=request.lease_id,
        devices={d.id: g.key for g, d in found},
        uid=peer.uid,
        gid=peer.gid,
        pid=peer.pid,
        created=request.created,
        holder=request.holder,
        connection=request.connection,
        owner=owner,
    )
    taken = {d.reserved_by for _, d in found if d.reserved_by is not None}  # the owner's own
    for old_id in sorted(taken):
        old = leases[old_id]
        devices = tuple(d for d in old.devices if d in lease.devices)
        why = f"replaced by {lease.id} of the same owner"
        take(draft, old, devices, "released", why, peer.uid)
    draft.put(F.leases, lease.id, lease)
    reason = f"granted to uid {peer.uid} (pid {peer.pid})"
    if owner is not None:
        reason += f" for {owner}"
    draft.lease_changes.append(LeaseChange("granted", lease, lease.device_ids, reason, peer.uid))
    return Grant(lease, found, minors)


def release(draft: Draft, request: ReleaseRequested) -> Answer:
    """A lease, or devices from the leases holding them; only the lease's uid or root may."""
    peer = request.peer
    refusal = may_change(draft.get(F.access), peer, "release")
    if refusal is None and request.owner is not None:
        refusal = may_own(draft, peer, request.owner, "release")
    if refusal is not None:
        return refusal
    leases = draft.get(F.leases)
    not_reserved: list[str] = []
    if request.lease_id is None and not request.device_ids and request.owner is not None:
        affected = {
            i: set(lease.devices) for i, lease in leases.items() if lease.owner == request.owner
        }
    elif request.lease_id is not None:
        lease = leases.get(request.lease_id)
        if lease is None:
            return Refusal(
                Reason.INVALID,
                f"No reservation {request.lease_id} is held.",
                {"reservation_id": request.lease_id},
            )
        affected = {lease.id: set(lease.devices)}
    else:
        found = resolve(draft, request.device_ids)
        if isinstance(found, Refusal):
            return found
        wanted = [d.id for _, d in found]
        affected = {
            held.id: set(wanted) & set(held.devices)
            for held in leases.values()
            if set(wanted) & set(held.devices)
        }
        held_devices = {d for devices in affected.values() for d in devices}
        not_reserved = [d for d in wanted if d not in held_devices]
    for lease_id in affected:
        owner = leases[lease_id].owner
        if owner is not None and owner != request.owner:
            refusal = may_own(draft, peer, owner, "release")
            if refusal is not None:
                data = {**(refusal.data or {}), "reservation_ids": [lease_id]}
                return attrs.evolve(refusal, data=data)
    refused = [
        i for i in affected if leases[i].owner is None and peer.uid not in (0, leases[i].uid)
    ]
    if refused:
        return Refusal(
            Reason.FORBIDDEN,
            "Only the user who made a reservation, or root, may release it: "
            + ", ".join(refused)
            + ".",
            {"reservation_ids": refused},
        )
    reason = f"released by uid {peer.uid} (pid {peer.pid})"
    return Released(_release_all(draft, affected, reason, peer.uid), not_reserved)


def _release_all(draft: Draft, affected: dict[str, set[str]], reason: str, by: int) -> list[str]:
    """Take these devices out of these leases; the devices released."""
    leases = draft.get(F.leases)
    released: list[str] = []
    for lease_id, devices in affected.items():
        lease = leases[lease_id]
        gone = tuple(d for d in lease.devices if d in devices)
        released.extend(gone)
        take(draft, lease, gone, "released", reason, by)
    return released


def reconcile(draft: Draft, request: ReconcileRequested) -> Answer:
    """The devices an owner still uses: its leases on every other device end, in one fold."""
    peer = request.peer
    refusal = may_change(draft.get(F.access), peer, "reconcile")
    if refusal is None:
        refusal = may_own(draft, peer, request.owner, "reconcile")
    if refusal is not None:
        return refusal
    index = device_index(draft.fingerprint())
    used = {index[i][1].id for i in request.device_ids if i in index}  # unknown: not held
    affected = {
        lease.id: set(lease.devices) - used
        for lease in draft.get(F.leases).values()
        if lease.owner == request.owner and set(lease.devices) - used
    }
    reason = f"reconciled by {request.owner} (uid {peer.uid}, pid {peer.pid})"
    return Released(_release_all(draft, affected, reason, peer.uid))


def take(
    draft: Draft,
    lease: Lease,
    devices: tuple[str, ...],
    kind: str,
    reason: str,
    by: int | None = None,
) -> None:
    """Take ``devices`` out of ``lease``; a lease left with none ends. ``by``: the uid that
    asked, if anyone did."""
    kept = {d: g for d, g in lease.devices.items() if d not in devices}
    if kept:
        draft.put(F.leases, lease.id, attrs.evolve(lease, devices=kept))
    else:
        draft.pop(F.leases, lease.id)
    draft.lease_changes.append(LeaseChange(kind, lease, devices, reason, by))


def lease_ended(draft: Draft, event: LeaseEnded) -> None:
    lease = draft.get(F.leases).get(event.lease_id)
    if lease is not None:
        reason = f"its holder process {lease.holder_pid} exited"
        take(draft, lease, lease.device_ids, "ended", reason)


def connection_closed(draft: Draft, event: ConnectionClosed) -> None:
    for lease in list(draft.get(F.leases).values()):
        if lease.connection == event.connection:
            take(draft, lease, lease.device_ids, "ended", "its connection closed")


def orphaned(state: State, lease: Lease) -> tuple[str, ...]:
    """The devices ``lease`` holds that are no longer on the host: held still, until released."""
    return tuple(d for d in lease.devices if state.parent_of(d) not in state.devices)


RULES: dict[type, Rule] = {
    LeaseEnded: lease_ended,
    ConnectionClosed: connection_closed,
}
REQUESTS: dict[type, RequestRule] = {
    ReserveRequested: reserve,
    ReleaseRequested: release,
    ReconcileRequested: reconcile,
}

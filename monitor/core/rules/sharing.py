"""Time-sliced sharing: how many replicas each device has, and what a reservation of them may be.

A device no lease holds has as many replicas as the policy (``State.share``) gives it. A lease
fixes the count: a device held whole stays whole (a lease of a whole device blocks its
replicas), and a shared device whose replicas are held keeps its count, so that no holder's
replica changes or vanishes under it. A new count for such a device takes effect when the last
of its leases ends; a policy change that has to wait says so (``Draft.notes``). A device that
comes back with leases on its replicas (a restart, a re-add) gets at least as many replicas as
they name.

The count is settled at the end of each fold, and before a request that follows other events,
for the devices the fold touched (``monitor.core.reducer``): no rule elsewhere has to know.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import attrs

from monitor.core.answers import Reason, Refusal
from monitor.core.draft import Draft, Rule
from monitor.core.events import PciFacts, SharePolicyChanged
from monitor.core.leases import Lease
from monitor.core.mig_devices import mig_group
from monitor.core.model import Device, DeviceGroup
from monitor.core.pci import class_matches, device_type, vendor_name
from monitor.core.replicas import SharePolicy, base_id, replica_id, split
from monitor.core.rules.nvidia import nvml_targets, sysfs_stats_targets
from monitor.core.state import F, State


@attrs.frozen
class Held:
    """What leases hold of one device."""

    whole: bool
    top: int  # the highest replica held, plus one (0: none)
    leases: tuple[str, ...]


def holds(leases: Iterable[Lease]) -> dict[str, Held]:
    found: dict[str, Held] = {}
    for lease in leases:
        for device_id in lease.devices:
            address, k = split(device_id)
            was = found.get(address, Held(False, 0, ()))
            found[address] = Held(
                was.whole or k is None,
                max(was.top, k + 1 if k is not None else 0),
                tuple(dict.fromkeys((*was.leases, lease.id))),
            )
    return found


def wanted(policy: SharePolicy, facts: PciFacts, name: str | None, classes: Iterable[str]) -> int:
    """The policy's count for a device (1 for one we do not follow)."""
    if not class_matches(facts.pci_class, classes):
        return 1
    vendor, type_ = vendor_name(facts.vendor_id), device_type(facts.pci_class)
    return policy.replicas_for(facts.vendor_id, facts.device_id, vendor, type_, name)


def settle(draft: Draft, addresses: Iterable[str] | None, *, announce: bool = False) -> None:
    """Bring these devices' replica counts (None: every device's) to the policy's where their
    leases let them; ``announce``: note each device whose change has to wait."""
    devices, current = draft.get(F.devices), draft.get(F.replicas)
    instances = _mig_devices(draft)
    if addresses is None:
        addresses = set(devices) | set(current) | set(instances)
    addresses = {base_id(a) for a in addresses}  # a lease's touch names its replicas too
    layouts = draft.get(F.mig)
    addresses |= {i.uuid for a in addresses if a in layouts for i in layouts[a].instances}
    policy, names, classes = draft.get(F.share), draft.get(F.names), draft.get(F.match_classes)
    held: Mapping[str, Held] | None = None
    for address in sorted(addresses):
        facts = devices.get(address)
        if address in instances:  # a MIG device: shared where a group rule names it
            want = policy.replicas_for_group(*instances[address])
        elif facts is None:  # its replicas leave with it (held ones stay shown, as departed)
            draft.pop(F.replicas, address)
            continue
        else:
            want = wanted(policy, facts, names.get(address), classes)
        layout = layouts.get(address)
        if layout is not None and layout.enabled and layout.instances:
            want = 1  # shown as its MIG devices: not time-sliced whole
        have = current.get(address, 1)
        if held is None:
            held = holds(draft.get(F.leases).values())
        hold = held.get(address)
        if hold is None:
            count = want
        elif hold.whole:
            count = 1
        elif have > 1:
            count = have
        else:  # seen (again) with its replicas held: at least as many as they name
            count = max(want, hold.top)
        if announce and hold is not None and count != want:
            draft.notes.append(
                f"{address} stays at {_replicas(count)} until its reservations end "
                f"({', '.join(hold.leases)}); then it will have {_replicas(want)}"
            )
        if count == 1:
            draft.pop(F.replicas, address)
        else:
            draft.put(F.replicas, address, count)


def _mig_devices(draft: Draft) -> dict[str, tuple[str, str, str]]:
    """Each MIG device of a named GPU, by MIG UUID, with its group (vendor, type, name)."""
    names = draft.get(F.names)
    return {
        i.uuid: mig_group("nvidia", names[address], i)
        for address, layout in draft.get(F.mig).items()
        if layout.enabled and address in names
        for i in layout.instances
    }


def _replicas(count: int) -> str:
    return "no replicas (leased whole)" if count == 1 else f"{count} replicas"


def share_policy_changed(draft: Draft, event: SharePolicyChanged) -> None:
    draft.set(F.share, event.policy)
    settle(draft, None, announce=True)


def shared_whole(state: State, device_id: str) -> tuple[str, list[str]] | None:
    """When ``device_id`` (a PCI address or GPU UUID) names a shared device: why it is not
    leased whole, and its replicas."""
    address = device_id if device_id in state.replicas else device_id.lower()  # a MIG UUID as is
    if address not in state.replicas:
        address = next((a for a, g in state.nvml.items() if g.uuid == device_id), address)
    count = state.replicas.get(address)
    if count is None:
        return None
    replicas = [replica_id(address, k) for k in range(count)]
    why = (
        f"{device_id} is shared as {count} replicas ({replicas[0]} to {replicas[-1]}) and is "
        "not reserved whole: reserve one of its replicas"
    )
    return why, replicas


def one_per_device(
    policy: SharePolicy, found: Iterable[tuple[DeviceGroup, Device]]
) -> Refusal | None:
    """With ``fail_requests_greater_than_one``: a request for two replicas of one device is
    refused, as they share its time and give no more compute than one."""
    if not policy.fail_requests_greater_than_one:
        return None
    per: dict[str, list[str]] = {}
    for _, device in found:
        address, k = split(device.id)
        if k is not None:
            per.setdefault(address, []).append(device.id)
    doubled = [i for ids in per.values() if len(ids) > 1 for i in ids]
    if not doubled:
        return None
    return Refusal(
        Reason.INVALID,
        f"Refusing more than one replica of a shared device ({', '.join(doubled)}): replicas "
        "share its time, so two give no more compute than one (fail_requests_greater_than_one).",
        {"device_ids": doubled},
    )


def measured(state: State) -> set[str]:
    """The devices statistics are about: each shown device, a shared one by its PCI address
    (its replicas share its figures), departed ones included (the sampler finds nothing)."""
    return {base_id(d) for d in state.fingerprint.devices()}


def sysfs_measured(state: State) -> list[str]:
    """The devices whose statistics come from sysfs (``sysfs_stats_targets``), by PCI address."""
    read = nvml_targets(state)
    return sorted({base_id(d) for d in sysfs_stats_targets(state)} - read.keys())


RULES: dict[type, Rule] = {SharePolicyChanged: share_policy_changed}

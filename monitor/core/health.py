"""Health as problems per cause, and the changes of it that the journal records.

A device's problems are keyed by cause, so that evidence of recovery for one cause (a PCI
``SUCCESSFUL_RECOVERY``) does not clear another (a wedged DRM device). A device is healthy when
it has a driver bound and no problem. Which event sets or clears which cause is the reducer's
decision; this module only names the causes and compares states.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import attrs

from monitor.core.events import PciFacts
from monitor.core.leases import Lease
from monitor.core.model import frozen_mapping

if TYPE_CHECKING:
    from monitor.core.reducer import State

# Causes of ill health; health_desc names them in sorted order.
CAUSE_PCI_ERROR = "pci_error"
CAUSE_DRM_WEDGED = "drm_wedged"
CAUSE_XID = "xid"  # an XID or double-bit ECC error that needs a reset
CAUSE_RECOVERY_ACTION = "recovery_action"  # NVML says the GPU needs an action
CAUSE_NVML = "nvml"  # NVML cannot reach the GPU (lost, hanging, cannot be watched)
NVIDIA_CAUSES = (CAUSE_XID, CAUSE_RECOVERY_ACTION, CAUSE_NVML)


@attrs.frozen
class Problem:
    """One reason a device is unhealthy."""

    desc: str
    lost: bool = False  # the device is gone until reset or replaced (journal priority crit)
    recovery_action: str | None = None  # what an operator or driver must do, where known
    xid: int | None = None  # the XID that caused it, for the journal


Problems = Mapping[str, Problem]  # cause -> problem


def frozen_problems(items: Mapping[str, Mapping[str, Problem]]) -> Mapping[str, Problems]:
    return frozen_mapping({k: frozen_mapping(v) for k, v in items.items() if v})


NO_DRIVER = Problem("no kernel driver bound", recovery_action="bind a driver")


def device_problems(facts: PciFacts, problems: Problems) -> list[Problem]:
    """Everything wrong with a device, in the order health_desc names it."""
    found = [problems[cause] for cause in sorted(problems)]
    return found if facts.driver else [NO_DRIVER, *found]


@attrs.frozen
class HealthTransition:
    """A device that turned unhealthy, changed why, or recovered: what the journal records."""

    kind: str  # "unhealthy", "lost" or "recovered"
    device_id: str
    vendor: str
    device_name: str
    health_desc: str  # now; for a recovery, what it was
    recovery_action: str | None = None
    reason: str | None = None  # for a recovery: the evidence
    uuid: str | None = None  # an NVIDIA GPU's
    xid: int | None = None


def health_transitions(old: State, new: State) -> list[HealthTransition]:
    """Devices whose health changed between two states, and devices that arrived unhealthy."""
    before = {d.id: d for _, d in old.fingerprint.devices().values()}
    transitions = []
    for group, device in new.fingerprint.devices().values():
        if device.id not in new.devices:
            continue  # departed while reserved: lease_warnings reports it
        previous = before.get(device.id)
        if previous is None and device.healthy:
            continue
        if previous is not None and (previous.healthy, previous.health_desc) == (
            device.healthy,
            device.health_desc,
        ):
            continue
        gpu = new.nvml.get(device.id)
        uuid = gpu.uuid if gpu else None
        if device.healthy:
            assert previous is not None
            reason = new.recoveries.get(device.id)
            transition = HealthTransition(
                "recovered", device.id, group.vendor, group.name, previous.health_desc, None, reason
            )
        else:
            problems = device_problems(new.devices[device.id], new.problems.get(device.id, {}))
            kind = "lost" if any(p.lost for p in problems) else "unhealthy"
            actions = [p.recovery_action for p in problems if p.recovery_action]
            xids = [p.xid for p in problems if p.xid is not None]
            transition = HealthTransition(
                kind,
                device.id,
                group.vendor,
                group.name,
                device.health_desc,
                actions[0] if actions else None,
                xid=xids[0] if xids else None,
            )
        transitions.append(attrs.evolve(transition, uuid=uuid))
    return transitions


@attrs.frozen
class LeaseWarning:
    """A reserved device that left the host or turned unhealthy: its holder must hear of it."""

    lease: Lease
    device_id: str
    health_desc: str


def lease_warnings(old: State, new: State) -> list[LeaseWarning]:
    """Reserved devices whose health got worse or changed between two states."""
    before = old.fingerprint.devices()
    after = new.fingerprint.devices()
    warnings = []
    for lease in new.leases.values():
        for device_id in lease.devices:
            device = after[device_id][1] if device_id in after else None
            if device is None or device.healthy:
                continue
            previous = before[device_id][1] if device_id in before else None
            if previous is None or previous.health_desc != device.health_desc:
                warnings.append(LeaseWarning(lease, device_id, device.health_desc))
    return warnings

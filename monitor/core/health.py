"""Health as problems per cause: the vocabulary the rules and the fingerprint share.

One vocabulary for every cause (DESIGN 3b): a device is ``healthy`` (schedulable), ``needs
reset`` (no new leases, current ones kept; clears when the driver's recovery action reads NONE
after a reset, on a rebind, or on re-adding) or ``unhealthy`` (until re-added or rebooted). Each
problem says which of the two it is; the device is as bad as its worst problem.

A device's problems are keyed by cause, so that evidence of recovery for one cause (a PCI
``SUCCESSFUL_RECOVERY``) does not clear another (a wedged DRM device). A device is healthy when
it has a driver bound and no problem. Which event sets or clears which cause is the rules'
decision (``monitor.core.rules``); this module only names the causes.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

import attrs

from monitor.core.model import frozen_mapping

if TYPE_CHECKING:  # events imports the XID policy, which speaks this vocabulary
    from monitor.core.events import PciFacts

HEALTHY = "healthy"
NEEDS_RESET = "needs reset"
UNHEALTHY = "unhealthy"

# Causes of ill health; health_desc names them in sorted order.
CAUSE_PCI_ERROR = "pci_error"
CAUSE_DRM_WEDGED = "drm_wedged"
CAUSE_XID = "xid"  # an XID or double-bit ECC error that needs a reset
CAUSE_RECOVERY_ACTION = "recovery_action"  # NVML says the GPU needs an action
CAUSE_NVML = "nvml"  # NVML cannot reach the GPU (lost, hanging, cannot be watched)
CAUSE_NVML_UUID = "nvml_uuid"  # NVML's UUID for the GPU cannot name it
CAUSE_CONDITIONS = "nvml_conditions"  # health conditions NVML reports (monitor.core.conditions)
NVIDIA_CAUSES = (CAUSE_XID, CAUSE_RECOVERY_ACTION, CAUSE_NVML, CAUSE_NVML_UUID, CAUSE_CONDITIONS)


@attrs.frozen
class Problem:
    """One reason a device is unhealthy."""

    desc: str
    lost: bool = False  # the device is gone until reset or replaced (journal priority crit)
    recovery_action: str | None = None  # what an operator or driver must do, where known
    xid: int | None = None  # the XID that caused it, for the journal
    health: str = UNHEALTHY  # or NEEDS_RESET: drained, its leases kept, cleared by a reset
    driver_action: int | None = None  # the driver's recovery action that caused it


Problems = Mapping[str, Problem]  # cause -> problem


def frozen_problems(items: Mapping[str, Mapping[str, Problem]]) -> Mapping[str, Problems]:
    if isinstance(items, MappingProxyType):  # frozen already (see frozen_mapping)
        return items
    return frozen_mapping({k: frozen_mapping(v) for k, v in items.items() if v})


NO_DRIVER = Problem("no kernel driver bound", recovery_action="bind a driver")


def device_problems(facts: PciFacts, problems: Problems) -> list[Problem]:
    """Everything wrong with a device, in the order health_desc names it."""
    found = [problems[cause] for cause in sorted(problems)]
    return found if facts.driver else [NO_DRIVER, *found]


def device_health(facts: PciFacts, problems: Problems) -> str:
    """HEALTHY, NEEDS_RESET or UNHEALTHY: the worst of the device's problems."""
    found = device_problems(facts, problems)
    if not found:
        return HEALTHY
    return NEEDS_RESET if all(p.health == NEEDS_RESET for p in found) else UNHEALTHY

"""What an XID, or the driver's recovery action, means for a GPU's health: one verdict function.

The catalog (``monitor.core.xid_catalog``) gives each XID NVIDIA's immediate action; this module
turns that action into the one health vocabulary (``monitor.core.health``):

- RESTART_APP, IGNORE (and XID 45's workflow, whose cleanup follows an error judged on its own):
  the GPU stays schedulable; the XID is counted and logged;
- RESET_GPU, XID 48's workflow and the NVLink workflows: the GPU needs a reset;
- RESTART_BM, RESTART_VM: unhealthy until the GPU is re-added or the node rebooted;
- CONTACT_SUPPORT and the actions only a person can take (CHECK_MECHANICALS, UPDATE_SWFW,
  CHECK_UVM), and XIDs not in the catalog: the operator's ``xid_unknown`` ("drain", the default,
  makes the GPU need a reset, since a GPU wrongly drained costs less than work scheduled onto a
  broken one; "report" only counts and logs).

Order of authority: the operator's overrides (``xid_fatal``, ``xid_ignore``) first, since they
are an explicit decision for this fleet; then the driver's recovery action when it asks for one
(it knows the GPU's state, the catalog only the XID); then the catalog. A recovery action of NONE
at the time of an XID says nothing: the driver announces its action after the XID (XID 154).
Every source of XIDs (NVML's events, the kernel log) is judged here.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import attrs

from monitor.core import xid_catalog as cat
from monitor.core.health import HEALTHY, NEEDS_RESET, UNHEALTHY

RESET = "reset the GPU"
REBOOT = "reboot the node"

UNKNOWN_DRAIN = "drain"
UNKNOWN_REPORT = "report"
NOT_IN_CATALOG = "NOT_IN_CATALOG"  # the action label of an XID the catalog does not list


@attrs.frozen
class CatalogEntry:
    xid: int
    mnemonic: str
    action: str
    meaning: str


CATALOG: Mapping[int, CatalogEntry] = MappingProxyType(
    {row[0]: CatalogEntry(*row) for row in cat.ROWS}
)

# Catalog action -> (health, what to do); None: the operator's xid_unknown decides.
_ACTION_HEALTH: dict[str, tuple[str, str | None] | None] = {
    cat.RESTART_APP: (HEALTHY, None),
    cat.IGNORE: (HEALTHY, None),
    cat.WORKFLOW_XID_45: (HEALTHY, None),
    cat.XID_154: (HEALTHY, None),  # the recovery action reported with it decides
    cat.RESET_GPU: (NEEDS_RESET, RESET),
    cat.WORKFLOW_XID_48: (NEEDS_RESET, RESET),
    cat.WORKFLOW_NVLINK_ERR: (NEEDS_RESET, RESET),
    cat.WORKFLOW_NVLINK5_ERR: (NEEDS_RESET, RESET),
    cat.RESTART_BM: (UNHEALTHY, REBOOT),
    cat.RESTART_VM: (UNHEALTHY, "restart the virtual machine"),
    cat.CONTACT_SUPPORT: None,
    cat.CHECK_MECHANICALS: None,
    cat.UPDATE_SWFW: None,
    cat.CHECK_UVM: None,
}

# NVML's recovery actions (nvmlDeviceGpuRecoveryAction_t in nvml.h): value -> (name, health,
# what to do). Everything but NONE drains; only a reboot needs more than NONE to clear.
RECOVERY_NONE = 0
RECOVERY_ACTIONS: Mapping[int, tuple[str, str, str]] = MappingProxyType(
    {
        0: ("NONE", HEALTHY, "nothing"),
        1: ("GPU_RESET", NEEDS_RESET, RESET),
        2: ("NODE_REBOOT", UNHEALTHY, REBOOT),
        3: ("DRAIN_P2P", NEEDS_RESET, "drain peer-to-peer work"),
        4: ("DRAIN_AND_RESET", NEEDS_RESET, "drain peer-to-peer work, then reset the GPU"),
        5: ("RECOVER_IMEX_DOMAIN", NEEDS_RESET, "recover the IMEX domain"),
        6: ("BUS_RESET", NEEDS_RESET, "reset the GPU's PCIe bus"),
        7: ("SYSTEM_REBOOT", UNHEALTHY, "reboot the system"),
    }
)


@attrs.frozen
class XidPolicy:
    enabled: bool = True  # False: XIDs are counted and logged, never change health
    ignore: frozenset[int] = frozenset()  # kept healthy, whatever the catalog says
    fatal: frozenset[int] = frozenset()  # at least a reset, whatever the catalog says
    unknown: str = UNKNOWN_DRAIN  # CONTACT_SUPPORT, a person's actions, XIDs not in the catalog


@attrs.frozen
class Verdict:
    """What an XID or a recovery action does to a GPU, and who decided it."""

    health: str  # HEALTHY, NEEDS_RESET or UNHEALTHY
    desc: str
    action: str  # the catalog's action (NOT_IN_CATALOG), or the driver's recovery action name
    decided_by: str  # catalog, driver, xid_ignore, xid_fatal, xid_unknown or xid_health
    recovery_action: str | None = None  # what to do, when not healthy
    lost: bool = False  # the GPU is gone (XID 79)

    @property
    def fatal(self) -> bool:
        return self.health != HEALTHY


def xid_action(xid: int) -> str:
    entry = CATALOG.get(xid)
    return entry.action if entry else NOT_IN_CATALOG


def xid_name(xid: int) -> str:
    entry = CATALOG.get(xid)
    if entry is None:
        return f"XID {xid} (not in NVIDIA's XID catalog)"
    return f"XID {xid} ({entry.meaning}; NVIDIA: {entry.action})"


def recovery_name(action: int) -> str:
    known = RECOVERY_ACTIONS.get(action)
    return known[0] if known else f"{action} (unknown to hotplug-monitor)"


def _outcome(health: str, todo: str | None) -> str:
    if health == HEALTHY:
        return "the GPU stays schedulable"
    state = "needs a reset" if health == NEEDS_RESET else "unhealthy"
    return f"{state}; recovery: {todo}"


def driver_verdict(action: int) -> Verdict:
    """What the driver's recovery action ``action`` means. A value this daemon does not know
    drains the GPU (until the driver reads NONE), naming the value."""
    name = recovery_name(action)
    health, todo = RECOVERY_ACTIONS.get(action, (name, NEEDS_RESET, RESET))[1:]
    if action == RECOVERY_NONE:
        desc = "the driver reports no recovery needed (recovery action NONE)"
    else:
        desc = f"the driver asks to {todo} (recovery action {name}): {_outcome(health, todo)}"
    return Verdict(health, desc, name, "driver", None if health == HEALTHY else todo)


def judge(xid: int, policy: XidPolicy, recovery_action: int | None = None) -> Verdict:
    """The one verdict on ``xid``: from the catalog, the operator's ``policy`` and the driver's
    ``recovery_action`` (None where the source does not report one)."""
    name, action = xid_name(xid), xid_action(xid)
    lost = xid == 79  # fallen off the bus: the journal says crit
    if not policy.enabled:
        return Verdict(HEALTHY, f"{name}: counted only (XID health is off)", action, "xid_health")
    mapped = _ACTION_HEALTH.get(action)
    if xid in policy.fatal:
        worse, todo_ = (
            (UNHEALTHY, REBOOT) if mapped and mapped[0] == UNHEALTHY else (NEEDS_RESET, RESET)
        )
        return Verdict(
            worse, f"{name}: {_outcome(worse, todo_)} (xid_fatal)", action, "xid_fatal", todo_, lost
        )
    if xid in policy.ignore:
        return Verdict(
            HEALTHY, f"{name}: the GPU stays schedulable (xid_ignore)", action, "xid_ignore"
        )
    if recovery_action is not None and recovery_action != RECOVERY_NONE:
        said = driver_verdict(recovery_action)
        desc = f"{name}; {said.desc}"
        return attrs.evolve(said, desc=desc, lost=lost)
    if mapped is None:
        why = "" if action == NOT_IN_CATALOG else " (the catalog asks a person to act)"
        if policy.unknown == UNKNOWN_REPORT:
            desc = f"{name}{why}: the GPU stays schedulable (xid_unknown = report)"
            return Verdict(HEALTHY, desc, action, "xid_unknown")
        desc = f"{name}{why}: {_outcome(NEEDS_RESET, RESET)} (xid_unknown = drain)"
        return Verdict(NEEDS_RESET, desc, action, "xid_unknown", RESET)
    health, todo = mapped
    if action == cat.RESTART_APP:
        desc = f"{name}: the application failed, the GPU stays schedulable"
    else:
        desc = f"{name}: {_outcome(health, todo)}"
    return Verdict(health, desc, action, "catalog", todo, lost)

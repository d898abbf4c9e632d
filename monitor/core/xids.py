"""What an NVIDIA XID means for a GPU's health: a small catalog and the operator's policy.

The XID numbers, meanings and recovery actions are facts from NVIDIA's XID catalog. Application
errors (the work on the GPU failed, the GPU did not) leave the GPU healthy; errors that need a GPU
reset or a node reboot make it unhealthy until the evidence says it recovered. An XID in neither
list is treated as fatal, as NVIDIA's own device plugin does: a GPU wrongly drained costs less
than work scheduled onto a broken one, and ``xid_ignore`` is there for the XIDs a fleet knows to
be harmless.
"""

from __future__ import annotations

import attrs

RESET = "reset the GPU"
REBOOT = "reboot the node"

# The work on the GPU failed; the GPU itself is fine.
APPLICATION_XIDS: dict[int, str] = {
    13: "graphics engine exception",
    31: "GPU memory page fault",
    43: "GPU stopped processing (channel reset)",
    45: "preemptive cleanup after a previous error",
    68: "video decoder exception",
    109: "context switch timeout",
}

# xid -> (meaning, recovery action, whether the GPU is lost until then)
FATAL_XIDS: dict[int, tuple[str, str, bool]] = {
    48: ("double-bit ECC error", RESET, False),
    62: ("internal micro-controller halt", RESET, False),
    64: ("ECC page retirement or row remapping failed", RESET, False),
    74: ("NVLink error", RESET, False),
    79: ("GPU has fallen off the bus", REBOOT, True),
    92: ("high single-bit ECC error rate", RESET, False),
    94: ("contained ECC error", RESET, False),
    95: ("uncontained ECC error", RESET, False),
    119: ("GSP RPC timeout", RESET, False),
    120: ("GSP error", RESET, False),
    140: ("unrecovered ECC error", RESET, False),
}


@attrs.frozen
class XidPolicy:
    enabled: bool = True  # False: XIDs are counted and logged, never change health
    ignore: frozenset[int] = frozenset()  # treated as application errors
    fatal: frozenset[int] = frozenset()  # treated as fatal, whatever the catalog says


@attrs.frozen
class XidVerdict:
    fatal: bool
    desc: str
    recovery_action: str | None = None
    lost: bool = False


def judge(xid: int, policy: XidPolicy) -> XidVerdict:
    """What ``xid`` means under ``policy``."""
    if xid in FATAL_XIDS:
        meaning, action, lost = FATAL_XIDS[xid]
    elif xid in APPLICATION_XIDS:
        meaning, action, lost = APPLICATION_XIDS[xid], None, False
    else:
        meaning, action, lost = "not in hotplug-monitor's catalog", RESET, False
    desc = f"XID {xid}: {meaning}"
    if not policy.enabled:
        return XidVerdict(False, f"{desc} (XID handling is off)")
    fatal = xid in policy.fatal or (
        xid not in policy.ignore and (xid in FATAL_XIDS or xid not in APPLICATION_XIDS)
    )
    if not fatal:
        return XidVerdict(False, f"{desc}: an application error, the GPU stays healthy")
    return XidVerdict(True, f"{desc}; recovery: {action or RESET}", action or RESET, lost)

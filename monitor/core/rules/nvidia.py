"""NVIDIA health and names, from what the NVML worker reports.

NVML facts belong to a GPU bound to ``nvidia`` (``monitor.core.rules.inventory`` drops them at
another binding), so what NVML says of any other device is ignored. A GPU waiting for its name
gets NVML's; once the wait is over (NVML did not answer within ``--nvml-timeout``, cannot watch
the GPU, or is absent) it gets the hardware database's, and keeps the name it got.

Recovery: NVML's recovery action "none" clears XID errors; NVML answering again clears "not
responding"; a rebind or a successful PCI recovery clears the rest (inventory's rules).
"""

from __future__ import annotations

from monitor.core.draft import Draft, Rule
from monitor.core.events import (
    NvmlAbsent,
    NvmlEventReported,
    NvmlGpuSeen,
    NvmlNameWaitOver,
    NvmlReachable,
    NvmlUnreachable,
    XidPolicyChanged,
    XidReported,
)
from monitor.core.health import (
    CAUSE_NVML,
    CAUSE_RECOVERY_ACTION,
    CAUSE_XID,
    Problem,
)
from monitor.core.pci import NVIDIA_VENDOR_ID, class_matches
from monitor.core.rules.inventory import database_name
from monitor.core.rules.problems import clear_problems, set_problem
from monitor.core.state import F, State
from monitor.core.xids import REBOOT, RESET, judge

# NVML's recovery actions (nvmlDeviceGpuRecoveryAction_t), as a person would say them.
RECOVERY_ACTIONS = {
    1: "reset the GPU",
    2: "reboot the node",
    3: "drain peer-to-peer traffic",
    4: "drain work, then reset the GPU",
}


def _bound_to_nvidia(draft: Draft, address: str) -> bool:
    facts = draft.get(F.devices).get(address)
    return facts is not None and facts.driver == "nvidia"


def _name(draft: Draft, address: str, name: str) -> None:
    """End a GPU's wait for a name with this one."""
    if draft.pop(F.naming, address) is not None:
        draft.put(F.names, address, name)


def _name_from_database(draft: Draft, address: str) -> None:
    facts = draft.get(F.devices).get(address)
    if facts is not None:
        _name(draft, address, database_name(facts))


def nvml_gpu_seen(draft: Draft, event: NvmlGpuSeen) -> None:
    gpu = event.gpu
    if _bound_to_nvidia(draft, gpu.address):
        draft.put(F.nvml, gpu.address, gpu)
        _name(draft, gpu.address, gpu.name)


def nvml_name_wait_over(draft: Draft, event: NvmlNameWaitOver) -> None:
    if draft.get(F.naming).get(event.address) == event.wait:
        _name_from_database(draft, event.address)


def nvml_absent(draft: Draft, event: NvmlAbsent) -> None:
    draft.set(F.nvml_names, False)
    waiting = draft.get(F.naming)
    for address in list(waiting):
        _name_from_database(draft, address)


def xid_reported(draft: Draft, event: XidReported) -> None:
    address, xid = event.address, event.xid
    if not _bound_to_nvidia(draft, address):
        return
    _, count = draft.get(F.xids).get(address, (0, 0))
    draft.put(F.xids, address, (xid, count + 1))
    verdict = judge(xid, draft.get(F.xid_policy))
    if verdict.fatal:
        problem = Problem(verdict.desc, verdict.lost, verdict.recovery_action, xid)
        set_problem(draft, address, CAUSE_XID, problem)


def nvml_event_reported(draft: Draft, event: NvmlEventReported) -> None:
    address, kind, action = event.address, event.kind, event.action
    if not _bound_to_nvidia(draft, address):
        return
    if kind == "double_bit_ecc":
        problem = Problem(f"double-bit ECC error; recovery: {RESET}", recovery_action=RESET)
        set_problem(draft, address, CAUSE_XID, problem)
    elif kind == "gpu_unavailable":
        desc = f"NVML reports the GPU unavailable; recovery: {RESET}"
        set_problem(draft, address, CAUSE_NVML, Problem(desc, lost=True, recovery_action=RESET))
    elif kind == "recovery_action" and not action:
        reason = "NVML reports it usable again (recovery action: none)"
        clear_problems(draft, address, (CAUSE_XID, CAUSE_RECOVERY_ACTION), reason)
    elif kind == "recovery_action" and action is not None:
        needed = RECOVERY_ACTIONS.get(action, f"recovery action {action}")
        problem = Problem(f"NVML asks to {needed}", recovery_action=needed)
        set_problem(draft, address, CAUSE_RECOVERY_ACTION, problem)


def nvml_unreachable(draft: Draft, event: NvmlUnreachable) -> None:
    address = event.address
    if not _bound_to_nvidia(draft, address):
        return
    _name_from_database(draft, address)  # NVML will not name it now
    problem = Problem(event.reason, lost=event.lost, recovery_action=REBOOT if event.lost else None)
    set_problem(draft, address, CAUSE_NVML, problem)


def nvml_reachable(draft: Draft, event: NvmlReachable) -> None:
    clear_problems(draft, event.address, (CAUSE_NVML,), "NVML answers for it again")


def xid_policy_changed(draft: Draft, event: XidPolicyChanged) -> None:
    """Adopt a new policy, and judge the XIDs that made devices unhealthy again by it."""
    policy = event.policy
    draft.set(F.xid_policy, policy)
    for address, causes in list(draft.get(F.problems).items()):
        problem = causes.get(CAUSE_XID)
        if problem is None or problem.xid is None:
            continue
        verdict = judge(problem.xid, policy)
        if verdict.fatal:
            again = Problem(verdict.desc, verdict.lost, verdict.recovery_action, problem.xid)
            set_problem(draft, address, CAUSE_XID, again)
        else:
            reason = f"the XID policy no longer counts XID {problem.xid}"
            clear_problems(draft, address, (CAUSE_XID,), reason)


def nvml_targets(state: State) -> dict[str, int]:
    """The GPUs the NVML worker is to watch: NVIDIA GPUs of the class filter bound to
    ``nvidia``, shown or waiting for a name; each with the PCI recoveries the kernel reported for
    it, so that a new number means "read it afresh, it was reset"."""
    return {
        address: state.resets.get(address, 0)
        for address, facts in state.devices.items()
        if facts.vendor_id == NVIDIA_VENDOR_ID
        and facts.driver == "nvidia"
        and class_matches(facts.pci_class, state.match_classes)
    }


RULES: dict[type, Rule] = {
    NvmlGpuSeen: nvml_gpu_seen,
    NvmlNameWaitOver: nvml_name_wait_over,
    NvmlAbsent: nvml_absent,
    XidReported: xid_reported,
    NvmlEventReported: nvml_event_reported,
    NvmlUnreachable: nvml_unreachable,
    NvmlReachable: nvml_reachable,
    XidPolicyChanged: xid_policy_changed,
}

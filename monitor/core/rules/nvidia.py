"""NVIDIA health and names, from what the NVML worker reports.

NVML facts belong to a GPU bound to ``nvidia`` (``monitor.core.rules.inventory`` drops them at
another binding), so what NVML says of any other device is ignored. A GPU waiting for its name
gets NVML's; once the wait is over (NVML did not answer within ``--nvml-timeout``, cannot watch
the GPU, or is absent) it gets the hardware database's, and keeps the name it got.

Which devices NVML reads (``read_by_nvml``) is decided here too: the GPUs the worker watches
and those it must watch afresh after a reset (``nvml_targets``, ``nvml_resets``), and the
devices whose statistics come from sysfs instead (``sysfs_stats_targets``).

XIDs and the driver's recovery action are judged by ``monitor.core.xids``, whatever their source.
Recovery: the driver's recovery action NONE clears what needs a reset (never what is unhealthy
until the GPU is re-added or the node rebooted); NVML answering again clears "not responding";
a rebind or a successful PCI recovery clears the rest (inventory's rules).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import attrs

from monitor.core.draft import Draft, Rule
from monitor.core.events import (
    NvmlAbsent,
    NvmlEventReported,
    NvmlGpuSeen,
    NvmlNameWaitOver,
    NvmlReachable,
    NvmlUnreachable,
    PciFacts,
    XidPolicyChanged,
    XidReported,
)
from monitor.core.health import (
    CAUSE_NVML,
    CAUSE_NVML_UUID,
    CAUSE_RECOVERY_ACTION,
    CAUSE_XID,
    NEEDS_RESET,
    Problem,
)
from monitor.core.pci import NVIDIA_VENDOR_ID, class_matches
from monitor.core.rules.inventory import database_name
from monitor.core.rules.mig_xids import count_on_instances, instance_scoped
from monitor.core.rules.problems import clear_problems, set_problem
from monitor.core.rules.witnesses import witnessed
from monitor.core.state import F, State
from monitor.core.text import is_gpu_uuid, shown
from monitor.core.xids import REBOOT, RECOVERY_NONE, RESET, Verdict, driver_verdict, judge


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
    """Take NVML's facts; an empty name (nothing printable was left) leaves the database's.
    A UUID that is not in NVIDIA's form is dropped, and its GPU is unhealthy."""
    gpu = event.gpu
    if not _bound_to_nvidia(draft, gpu.address):
        return
    if not is_gpu_uuid(gpu.uuid):
        desc = f"NVML reported a malformed UUID ({shown(gpu.uuid, 80)})"
        set_problem(draft, gpu.address, CAUSE_NVML_UUID, Problem(desc))
        gpu = attrs.evolve(gpu, uuid="")
    draft.put(F.nvml, gpu.address, gpu)
    _judge_shared_uuids(draft)
    if gpu.name:
        _name(draft, gpu.address, gpu.name)
    else:
        _name_from_database(draft, gpu.address)


def _judge_shared_uuids(draft: Draft) -> None:
    """A UUID that NVML gives two GPUs names neither: no container runtime could be told which
    is meant, so both are unhealthy (and the fingerprint shows neither UUID) until NVML tells
    them apart."""
    holders: dict[str, list[str]] = {}
    for address, gpu in draft.get(F.nvml).items():
        if gpu.uuid:
            holders.setdefault(gpu.uuid.lower(), []).append(address)
    for addresses in holders.values():
        if len(addresses) == 1:
            reason = "NVML reports a UUID of its own for it"
            clear_problems(draft, addresses[0], (CAUSE_NVML_UUID,), reason)
            continue
        problem = Problem(f"NVML reported one UUID for {', '.join(sorted(addresses))}")
        for address in addresses:
            set_problem(draft, address, CAUSE_NVML_UUID, problem)


def nvml_name_wait_over(draft: Draft, event: NvmlNameWaitOver) -> None:
    if draft.get(F.naming).get(event.address) == event.wait:
        _name_from_database(draft, event.address)


def nvml_absent(draft: Draft, event: NvmlAbsent) -> None:
    draft.set(F.nvml_names, False)
    waiting = draft.get(F.naming)
    for address in list(waiting):
        _name_from_database(draft, address)


def _problem(verdict: Verdict, xid: int | None = None, action: int | None = None) -> Problem:
    return Problem(verdict.desc, verdict.lost, verdict.recovery_action, xid, verdict.health, action)


def _driver_action(draft: Draft, address: str) -> int | None:
    problem = draft.get(F.problems).get(address, {}).get(CAUSE_RECOVERY_ACTION)
    return problem.driver_action if problem is not None else None


def _driver_says(draft: Draft, address: str, action: int) -> None:
    """The driver's recovery action, the authority on what the GPU needs: NONE clears what
    needs a reset (the reset was done); anything else drains the GPU as it says."""
    if action != RECOVERY_NONE:
        verdict = driver_verdict(action)
        set_problem(draft, address, CAUSE_RECOVERY_ACTION, _problem(verdict, action=action))
        return
    # NONE withdraws the driver's own request, whatever it was, and says a reset was done; an
    # XID that needs a reboot stays until the GPU is re-added or the node rebooted.
    xid = draft.get(F.problems).get(address, {}).get(CAUSE_XID)
    done = [CAUSE_RECOVERY_ACTION]
    if xid is not None and xid.health == NEEDS_RESET:
        done.append(CAUSE_XID)
    clear_problems(
        draft, address, done, "the driver reports it usable again (recovery action NONE)"
    )


def xid_reported(draft: Draft, event: XidReported) -> None:
    """Count the XID, and judge it: by the operator's policy, the driver's recovery action (the
    one reported with it, else the last one reported) and NVIDIA's catalog. An XID that the
    other source (NVML, the kernel log) reported a moment ago counts once."""
    counted = witnessed(draft, event)  # its device, unless another source reported it already
    if counted is None:
        return
    address, xid = counted.address, counted.xid
    if not _bound_to_nvidia(draft, address):
        return
    action = event.recovery_action
    verdict = judge(
        xid, draft.get(F.xid_policy), _driver_action(draft, address) if action is None else action
    )
    instances = instance_scoped(draft, event, address, verdict)
    if instances:  # the application in that MIG instance failed: counted there alone
        count_on_instances(draft, instances, xid, counted.source)
        return
    _, count = draft.get(F.xids).get(address, (0, 0))
    draft.put(F.xids, address, (xid, count + 1))
    if event.recovery_action is not None:
        _driver_says(draft, address, event.recovery_action)
    current = draft.get(F.problems).get(address, {}).get(CAUSE_XID)
    if verdict.fatal and not _milder(verdict, current):
        set_problem(draft, address, CAUSE_XID, _problem(verdict, xid))


def _milder(verdict: Verdict, current: Problem | None) -> bool:
    """A reset-needing XID does not hide an earlier one that needs a reboot."""
    return current is not None and verdict.health == NEEDS_RESET and current.health != NEEDS_RESET


def nvml_event_reported(draft: Draft, event: NvmlEventReported) -> None:
    address, kind, action = event.address, event.kind, event.action
    if not _bound_to_nvidia(draft, address):
        return
    if kind == "double_bit_ecc":
        desc = f"double-bit ECC error: needs a reset; recovery: {RESET}"
        problem = Problem(desc, recovery_action=RESET, health=NEEDS_RESET)
        set_problem(draft, address, CAUSE_XID, problem)
    elif kind == "gpu_unavailable":
        desc = f"NVML reports the GPU unavailable: unhealthy; recovery: {RESET}"
        set_problem(draft, address, CAUSE_NVML, Problem(desc, lost=True, recovery_action=RESET))
    elif kind == "recovery_action":
        _driver_says(draft, address, action or RECOVERY_NONE)


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
        verdict = judge(problem.xid, policy, _driver_action(draft, address))
        if verdict.fatal:
            set_problem(draft, address, CAUSE_XID, _problem(verdict, problem.xid))
        else:
            reason = f"the XID policy no longer counts XID {problem.xid}"
            clear_problems(draft, address, (CAUSE_XID,), reason)


def read_by_nvml(facts: PciFacts, match_classes: Iterable[str]) -> bool:
    """Whether NVML reads this device (its names, health and statistics): an NVIDIA GPU of the
    class filter bound to ``nvidia``. Every other device's statistics come from sysfs."""
    return (
        facts.vendor_id == NVIDIA_VENDOR_ID
        and facts.driver == "nvidia"
        and class_matches(facts.pci_class, match_classes)
    )


def nvml_targets(state: State) -> dict[str, int]:
    """The GPUs the NVML worker is to watch: NVIDIA GPUs of the class filter bound to
    ``nvidia``, shown or waiting for a name; each with the PCI recoveries the kernel reported for
    it, so that a new number means "read it afresh, it was reset"."""
    return {
        address: state.resets.get(address, 0)
        for address, facts in state.devices.items()
        if read_by_nvml(facts, state.match_classes)
    }


def nvml_resets(told: Mapping[str, int] | None, targets: Mapping[str, int]) -> list[str]:
    """The targets to watch afresh, sorted: those the worker was told of before (``told``, the
    previous ``nvml_targets``; None before the first) whose PCI recoveries have changed since. A
    GPU new to the worker is watched afresh anyway; the first targets reset none."""
    if not told:
        return []
    return sorted(a for a, resets in targets.items() if told.get(a, resets) != resets)


def sysfs_stats_targets(state: State) -> list[str]:
    """The shown devices whose statistics come from sysfs: all but those NVML reads."""
    nvml = nvml_targets(state)
    # a MIG device's GPU is NVML's: its MIG devices have no sysfs figures of their own
    return [d for d in state.fingerprint.devices() if state.parent_of(d) not in nvml]


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

"""Health conditions NVML reports (``monitor.core.conditions``): what they do to a GPU's health.

The worker sends a GPU's conditions when they change. Each is judged by the policy table and
the operator's ``health_ignore``/``health_fatal``; those that drain the GPU make one problem
(cause ``nvml_conditions``), as bad as the worst of them, whose description names each. The
GPU recovers from them on evidence only: NVML no longer reports the condition (the journal says
which), a rebind, or re-adding (inventory's rules).
"""

from __future__ import annotations

from collections.abc import Mapping

from monitor.core.conditions import POLICY, ConditionVerdict, HealthPolicy, judge_all
from monitor.core.draft import Draft, Rule
from monitor.core.events import GpuConditions, HealthPolicyChanged
from monitor.core.health import CAUSE_CONDITIONS, HEALTHY, NEEDS_RESET, UNHEALTHY, Problem
from monitor.core.rules.problems import clear_problems, set_problem
from monitor.core.state import F


def draining(conditions: Mapping[str, str], policy: HealthPolicy) -> list[ConditionVerdict]:
    """The verdicts that take the GPU out of service, worst first."""
    bad = [v for v in judge_all(conditions, policy).values() if v.health != HEALTHY]
    return sorted(bad, key=lambda v: (v.health != UNHEALTHY, v.name))


def condition_problem(verdicts: list[ConditionVerdict]) -> Problem:
    """One problem for all of them: as bad as the worst, naming each."""
    worst = verdicts[0]
    health = UNHEALTHY if worst.health == UNHEALTHY else NEEDS_RESET
    return Problem("; ".join(v.desc for v in verdicts), recovery_action=worst.todo, health=health)


def _meaning(name: str) -> str:
    row = POLICY.get(name)
    return row.meaning if row else name.replace("_", " ")


def _judge(draft: Draft, address: str, before: Mapping[str, str], why: str) -> None:
    policy = draft.get(F.health_policy)
    now = draft.get(F.conditions).get(address, {})
    bad = draining(now, policy)
    if bad:
        set_problem(draft, address, CAUSE_CONDITIONS, condition_problem(bad))
        return
    ended = [_meaning(v.name) for v in draining(before, policy) if v.name not in now]
    reason = f"NVML no longer reports {', '.join(ended)}" if ended else why
    clear_problems(draft, address, (CAUSE_CONDITIONS,), reason)


def gpu_conditions(draft: Draft, event: GpuConditions) -> None:
    address = event.address
    facts = draft.get(F.devices).get(address)
    if facts is None or facts.driver != "nvidia":
        return  # NVML's facts belong to a GPU bound to nvidia
    before = draft.get(F.conditions).get(address, {})
    if dict(before) == dict(event.conditions):
        return
    if event.conditions:
        draft.put(F.conditions, address, event.conditions)
    else:
        draft.pop(F.conditions, address)
    _judge(draft, address, before, "NVML reports no health condition")


def health_policy_changed(draft: Draft, event: HealthPolicyChanged) -> None:
    """Adopt a new policy, and judge every GPU's conditions again by it."""
    old = draft.get(F.health_policy)
    if old == event.policy:
        return
    draft.set(F.health_policy, event.policy)
    for address, conditions in list(draft.get(F.conditions).items()):
        was = {v.name for v in draining(conditions, old)}
        still = {v.name for v in draining(conditions, event.policy)}
        gone = ", ".join(_meaning(n) for n in sorted(was - still))
        why = f"the health policy no longer drains a GPU on {gone}"
        _judge(draft, address, {}, why)


RULES: dict[type, Rule] = {
    GpuConditions: gpu_conditions,
    HealthPolicyChanged: health_policy_changed,
}

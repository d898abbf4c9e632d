"""The one place that decides what an event means.

Everything that decides a transition lives in the core (``monitor.core``): which facts an event
changes, what it does to a device's health and name, and who gets a lease. The rules are plain
functions grouped by family (``monitor.core.rules``: inventory and health, NVIDIA, leasing), one
per kind of event; ``fold`` hands each event to its rule on a draft of the state and returns the
new state, the patch between the two fingerprints, and each request's answer. No I/O, no clock,
no trio: a test of any decision is a plain call.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import attrs

from monitor.core.answers import Answer, Reason, Refusal
from monitor.core.draft import Draft, RequestRule, Rule
from monitor.core.events import Event, Request
from monitor.core.fingerprint import Patch
from monitor.core.leases import Lease, LeaseChange
from monitor.core.rules import conditions, inventory, leasing, mig, nvidia, sharing
from monitor.core.state import State

EVENT_RULES: dict[type, Rule] = {
    **inventory.RULES,
    **nvidia.RULES,
    **conditions.RULES,
    **leasing.RULES,
    **mig.RULES,
    **sharing.RULES,
}
REQUEST_RULES: dict[type, RequestRule] = leasing.REQUESTS


@attrs.frozen
class Reduction:
    state: State
    patch: Patch | None
    answers: Mapping[int, Answer] = attrs.field(factory=dict)  # by request token
    # What happened, for the journal: devices that recovered and why, and lease changes.
    recoveries: Mapping[str, str] = attrs.field(factory=dict)
    lease_changes: tuple[LeaseChange, ...] = ()
    notes: tuple[str, ...] = ()  # what the operator must be told (a setting that has to wait)


def fold(state: State, events: Iterable[Event]) -> Reduction:
    """Fold a batch of events, requests among them, into one state and one patch.

    Each request is decided against the devices and leases as the events before it left them,
    so requests in one batch are decided one after the other, as if they came one by one.
    The replica counts of the devices touched are settled before a request that follows other
    events, and at the end (``monitor.core.rules.sharing``)."""
    draft = Draft(state)
    answers: dict[int, Answer] = {}
    events_since = False  # events folded since the counts were last settled
    for event in events:
        if isinstance(event, Request):
            if events_since:
                sharing.settle(draft, draft.touched())
                events_since = False
            answers[event.token] = REQUEST_RULES[type(event)](draft, event)
        else:
            EVENT_RULES[type(event)](draft, event)
            events_since = True
    if draft.changed:
        sharing.settle(draft, draft.touched())
    new, patch = draft.commit()
    return Reduction(
        new, patch, answers, draft.recoveries, tuple(draft.lease_changes), tuple(draft.notes)
    )


def reduce(state: State, event: Event) -> tuple[State, Patch | None]:
    """Fold one event into the state."""
    return reduce_all(state, (event,))


def reduce_all(state: State, events: Iterable[Event]) -> tuple[State, Patch | None]:
    """Fold a batch of events into the state, with one patch (and generation) for all of them."""
    reduction = fold(state, events)
    return reduction.state, reduction.patch


def durable_leases(state: State) -> dict[str, Lease]:
    """The leases kept on disk: all but connection-bound ones."""
    return {i: lease for i, lease in state.leases.items() if lease.durable}


def fold_unrecorded(state: State, events: Iterable[Event], why: str) -> Reduction:
    """The fold when its lease changes could not be made durable: everything but the requests
    happens (devices, health), and each request is refused, saying why."""
    events = list(events)
    reduction = fold(state, [e for e in events if not isinstance(e, Request)])
    refusal = Refusal(
        Reason.NOT_RECORDED,
        f"The daemon could not record the change on disk, so it did not make it: {why}.",
    )
    answers = {e.token: refusal for e in events if isinstance(e, Request)}
    return attrs.evolve(reduction, answers=answers)

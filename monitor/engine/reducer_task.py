"""The reducer task: the one task that changes the state.

It takes what the sources saw and what clients asked, lets the reducer decide, writes the leases
to disk before anyone hears of a change to them, publishes the new state, and only then answers
the requests. A request answered is therefore a lease on disk: a crash right after the answer
loses nothing.
"""

from __future__ import annotations

import logging

import attrs
import trio

from monitor.core.events import Event, ReleaseRequested, ReserveRequested
from monitor.core.health import health_transitions, lease_warnings
from monitor.core.leases import Lease
from monitor.core.reducer import Reduction, State, fold
from monitor.engine.hub import Hub
from monitor.outputs import logs
from monitor.outputs.store import LeaseStore, StoreError
from monitor.serving.server import Item, Pending
from monitor.sources.holders import HolderWatch
from monitor.wire.protocol import INTERNAL_ERROR, RpcError

log = logging.getLogger(__name__)

MAX_COALESCED = 4096  # events folded into one patch when they are already waiting

Incoming = trio.MemoryReceiveChannel[Item]


def durable(state: State) -> dict[str, Lease]:
    return {i: lease for i, lease in state.leases.items() if lease.durable}


async def run_engine(
    hub: Hub, receive: Incoming, store: LeaseStore, watch: HolderWatch | None = None
) -> None:
    async with receive:  # closed on exit, so that nobody waits on a task that is gone
        async for first in receive:
            events: list[Event] = []
            pending: list[Pending] = []
            item = first
            while True:
                if isinstance(item, Pending):
                    events.append(item.event)
                    pending.append(item)
                else:
                    events.extend(item)
                if len(events) >= MAX_COALESCED:
                    break
                try:
                    item = receive.receive_nowait()
                except trio.WouldBlock:
                    break
            old = hub.state
            reduction = await _decide(old, events, store)
            _report(old, reduction.state)
            hub.publish(reduction.state, reduction.patch)
            if watch is not None:
                watch.update(reduction.state.leases)
            for request in pending:
                request.answer = reduction.answers[request.key]
                request.done.set()


async def _decide(old: State, events: list[Event], store: LeaseStore) -> Reduction:
    """The reducer's decision, made durable; if the disk refuses, the requests are refused."""
    reduction = fold(old, events)
    if durable(reduction.state) == durable(old):
        return reduction
    try:
        await trio.to_thread.run_sync(store.save, reduction.state.leases.values())
    except StoreError as exc:
        # Nothing a client asked for in this batch happens; all else (devices, health) does.
        log.error("reservations refused: %s", exc)
        requests = (ReserveRequested, ReleaseRequested)
        without = fold(old, [e for e in events if not isinstance(e, requests)])
        refusal = RpcError(
            INTERNAL_ERROR,
            f"The daemon could not record the change on disk, so it did not make it: {exc}.",
        )
        return attrs.evolve(without, answers={key: refusal for key in _request_keys(events)})
    return reduction


def _request_keys(events: list[Event]) -> list[str | int]:
    keys: list[str | int] = []
    for event in events:
        if isinstance(event, ReserveRequested):
            keys.append(event.lease.id)
        elif isinstance(event, ReleaseRequested):
            keys.append(event.token)
    return keys


def _report(old: State, new: State) -> None:
    if new.fingerprint is old.fingerprint:
        return
    for transition in health_transitions(old, new):
        logs.report_health(log, transition)
    for warning in lease_warnings(old, new):
        logs.report_lease_warning(log, warning)

"""The reducer task: the one task that changes the state.

It takes what the sources saw and what clients asked, lets the core decide, writes the leases to
disk before anyone hears of a change to them, publishes the new state, and only then answers the
requests. A request answered is therefore a lease on disk: a crash right after the answer loses
nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import trio

from monitor.core.events import Event
from monitor.core.reducer import Reduction, durable_leases, fold, fold_unrecorded
from monitor.core.state import State
from monitor.core.transitions import Entry, journal_entries
from monitor.engine.hub import Hub
from monitor.engine.inbox import InboxReader, Pending
from monitor.engine.stats import Histogram
from monitor.outputs import logs
from monitor.outputs.store import LeaseStore, StoreError
from monitor.sources.counts import Received
from monitor.sources.holders import HolderWatch

log = logging.getLogger(__name__)

MAX_COALESCED = 4096  # events folded into one patch when they are already waiting


async def run_engine(
    hub: Hub,
    receive: InboxReader,
    store: LeaseStore,
    watch: HolderWatch | None = None,
    latency: Histogram | None = None,
    report: Callable[[Entry], None] | None = None,
) -> None:
    """Fold what comes in; ``latency`` observes how long uevents took from netlink to publish,
    and ``report`` writes what each fold did to the journal (each entry as it is, if none)."""
    report = report or partial(logs.report, log)
    async with receive:  # closed on exit, so that nobody waits on a task that is gone
        async for first in receive:
            events: list[Event] = []
            pending: list[Pending] = []
            received: list[float] = []
            item = first
            while True:
                if isinstance(item, Pending):
                    events.append(item.request)
                    pending.append(item)
                elif isinstance(item, Received):
                    events.extend(item.events)
                    received.append(item.at)
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
            for entry in journal_entries(old, reduction):
                report(entry)
            for note in reduction.notes:
                log.warning("%s", note)
            hub.publish(reduction.state, reduction.patch)
            if latency is not None:
                published = trio.current_time()
                for at in received:
                    latency.observe(published - at)
            if watch is not None:
                watch.update(reduction.state.leases)
            for request in pending:
                request.answer = reduction.answers[request.request.token]
                request.done.set()


async def _decide(old: State, events: list[Event], store: LeaseStore) -> Reduction:
    """The core's decision, made durable; if the disk refuses, the requests are refused."""
    reduction = fold(old, events)
    leases = reduction.state.leases
    if leases is old.leases or durable_leases(reduction.state) == durable_leases(old):
        return reduction
    try:
        await trio.to_thread.run_sync(store.save, reduction.state.leases.values())
    except StoreError as exc:
        log.error("reservations refused: %s", exc)
        return fold_unrecorded(old, events, str(exc))
    return reduction

"""The reducer task: the one task that changes the state.

It takes what the sources saw and what clients asked, lets the core decide, writes the leases to
disk before anyone hears of a change to them, publishes the new state, and only then answers the
requests. A request answered is therefore a lease on disk: a crash right after the answer loses
nothing.

The write is double-buffered. While one record is on its way to the disk (``fdatasync`` in a
worker thread), the reducer already folds the batches that come on top of it; they go to disk
together in the next record, and each is published and answered only after it, in order. If a
write fails, its batches' requests are refused and the batches folded on top of them are folded
again on the state that stands. A batch with nothing to write is committed at once when nothing
is being written, without a hop to the committing task.
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
from monitor.engine.inbox import InboxReader, Item, Pending
from monitor.engine.stats import Histogram
from monitor.outputs import logs
from monitor.outputs.store import LeaseStore, StoreError
from monitor.sources.counts import Received
from monitor.sources.holders import HolderWatch

log = logging.getLogger(__name__)

MAX_COALESCED = 4096  # events folded into one patch when they are already waiting
MAX_AHEAD = 32  # batches folded and waiting for their write before the reducer waits too


class Folded:
    """A batch folded on ``base``, the state the batches before it leave, waiting to commit."""

    def __init__(
        self, base: State, events: list[Event], pending: list[Pending], received: list[float]
    ) -> None:
        self.base = base
        self.events = events
        self.pending = pending
        self.received = received  # when its uevents came off netlink
        self.reduction = fold(base, events)
        self.durable = _durable_change(base, self.reduction)


class Committer:
    """Writes, publishes and answers folded batches in the order they were folded: the batches
    folded while one write runs go to disk together in the next (group commit)."""

    def __init__(
        self,
        hub: Hub,
        store: LeaseStore,
        watch: HolderWatch | None,
        latency: Histogram | None,
        report: Callable[[Entry], None],
    ) -> None:
        self.hub = hub
        self.store = store
        self.watch = watch
        self.latency = latency
        self.report = report
        self.head = hub.state  # the state the next batch folds on: the newest folded
        self.waiting: list[Folded] = []  # folded, for the next write
        self.writing = False  # a group is being written and committed
        self.closed = False  # no more batches come
        self._work = trio.lowlevel.ParkingLot()  # the committer waits here for batches
        self._room = trio.lowlevel.ParkingLot()  # the reducer, when too many wait

    @property
    def idle(self) -> bool:
        return not self.writing and not self.waiting

    async def add(self, batch: Folded) -> None:
        """Hand a batch over; waits while MAX_AHEAD batches already wait for their write."""
        while len(self.waiting) >= MAX_AHEAD:
            await self._room.park()
        self.waiting.append(batch)
        self._work.unpark_all()

    def close(self) -> None:
        self.closed = True
        self._work.unpark_all()

    async def run(self) -> None:
        """Commit each group of batches waiting, until closed and none is left."""
        while True:
            while not self.waiting:
                if self.closed:
                    return
                await self._work.park()
            group, self.waiting = self.waiting, []
            self._room.unpark_all()
            self.writing = True
            try:
                await self._write(group)
                for batch in group:
                    self.commit(batch)
            finally:
                self.writing = False
            if not self.waiting:  # the next batch folds on what stands (after a refusal too)
                self.head = self.hub.state

    async def _write(self, group: list[Folded]) -> None:
        """Put the group's lease changes on disk in one record; if the disk refuses, every
        request in the group is refused."""
        standing = self.hub.state
        if group[0].base is not standing:  # a group before it was refused: fold them again
            state = standing
            for batch in group:
                batch.base, batch.reduction = state, fold(state, batch.events)
                batch.durable = _durable_change(state, batch.reduction)
                state = batch.reduction.state
        if not any(batch.durable for batch in group):
            return
        leases = group[-1].reduction.state.leases.values()
        try:
            await trio.to_thread.run_sync(self.store.save, leases)
        except StoreError as exc:
            log.error("reservations refused: %s", exc)
            state = standing
            for batch in group:
                batch.base, batch.reduction = state, fold_unrecorded(state, batch.events, str(exc))
                state = batch.reduction.state

    def commit(self, batch: Folded) -> None:
        """Publish the batch's state and answer its requests (its changes are on disk)."""
        reduction = batch.reduction
        for entry in journal_entries(batch.base, reduction):
            self.report(entry)
        for note in reduction.notes:
            log.warning("%s", note)
        self.hub.publish(reduction.state, reduction.patch)
        if self.latency is not None:
            published = trio.current_time()
            for at in batch.received:
                self.latency.observe(published - at)
        if self.watch is not None:
            self.watch.update(reduction.state.leases)
        for request in batch.pending:
            request.answer = reduction.answers[request.request.token]
            request.done.set()


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
    committer = Committer(hub, store, watch, latency, report or partial(logs.report, log))
    async with receive, trio.open_nursery() as nursery:  # receive closed on exit, so that
        nursery.start_soon(committer.run)  # nobody waits on a task that is gone
        try:
            async for first in receive:
                batch = Folded(committer.head, *_gather(first, receive))
                committer.head = batch.reduction.state
                if not batch.durable and committer.idle:
                    committer.commit(batch)  # nothing to wait for: no hop to the committer
                else:
                    await committer.add(batch)
        finally:
            committer.close()


def _gather(first: Item, receive: InboxReader) -> tuple[list[Event], list[Pending], list[float]]:
    """The events and requests waiting, from ``first`` on, up to MAX_COALESCED events."""
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
            return events, pending, received
        try:
            item = receive.receive_nowait()
        except trio.WouldBlock:
            return events, pending, received


def _durable_change(old: State, reduction: Reduction) -> bool:
    """Whether the fold changed the leases kept on disk."""
    leases = reduction.state.leases
    if leases is old.leases:
        return False
    return durable_leases(reduction.state) != durable_leases(old)

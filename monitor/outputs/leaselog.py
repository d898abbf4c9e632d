"""Lease changes to the journal, without letting one user's burst push others' entries out.

journald drops a service's entries past its rate limit, whichever entries they are: a member of
the daemon's group looping over reserve and release would take root's grants and the health
alerts with it. So root's and the daemon's own lease changes each get a line of their own, as
health alerts and revocations always do (``monitor.outputs.logs``); anyone else's first change
gets a line, and the rest of a burst are counted into one summary line a second for as long as
it lasts. The lease journal on disk keeps every change in full.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

import attrs
import trio

from monitor.core.leases import LeaseChange
from monitor.core.transitions import Entry
from monitor.outputs import logs

SUMMARY_EVERY = 1.0  # seconds


@attrs.define
class _Burst:
    until: float  # when its summary is due
    kinds: Counter[str] = attrs.field(factory=Counter)
    leases: set[str] = attrs.field(factory=set)


class LeaseLog:
    """What the reducer task reports, with other users' bursts of lease changes summarised."""

    def __init__(
        self,
        log: logging.Logger,
        own_uid: int,
        clock: Callable[[], float] = time.monotonic,
        every: float = SUMMARY_EVERY,
    ) -> None:
        self.log = log
        self.own_uid = own_uid
        self.clock = clock
        self.every = every
        self._bursts: dict[int, _Burst] = {}
        self._due = trio.Event()  # set while a summary is waiting for its time

    def report(self, entry: Entry) -> None:
        if not isinstance(entry, LeaseChange):
            logs.report(self.log, entry)  # health, devices, revocations: never summarised
            return
        uid = entry.on_account_of
        burst = self._bursts.get(uid)
        if uid in (0, self.own_uid) or burst is None:
            logs.report_lease_change(self.log, entry)
            if uid not in (0, self.own_uid):
                self._bursts[uid] = _Burst(self.clock() + self.every)
                self._due.set()
            return
        burst.kinds[entry.kind] += 1
        burst.leases.add(entry.lease.id)

    def flush(self) -> float | None:
        """Write the summaries that are due; when the next one will be, if any."""
        now = self.clock()
        for uid, burst in list(self._bursts.items()):
            if burst.until > now:
                continue
            if not burst.kinds:  # the burst is over: its next change gets a line again
                del self._bursts[uid]
                continue
            self._summarise(uid, burst)
            self._bursts[uid] = _Burst(now + self.every)
        return min((b.until for b in self._bursts.values()), default=None)

    def _summarise(self, uid: int, burst: _Burst) -> None:
        count = sum(burst.kinds.values())
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(burst.kinds.items()))
        fields = {"MESSAGE_ID": logs.MESSAGE_IDS["lease_summary"], "LEASE_UID": uid}
        fields["CHANGES"] = count
        self.log.info(
            "uid %d made %d more lease change%s (%s, %d reservation%s) in %g s; the lease "
            "journal records each",
            uid, count, "s" * (count != 1), kinds, len(burst.leases),
            "s" * (len(burst.leases) != 1), self.every, extra={"journal": fields},
        )  # fmt: skip

    async def run(self) -> None:
        """Write each summary when it is due; asleep while no burst is under way."""
        while True:
            await self._due.wait()
            due = self.flush()
            if due is None:
                self._due = trio.Event()
                continue
            await trio.sleep(max(0.0, due - self.clock()))

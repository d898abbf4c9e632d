"""The NVML workers: which GPUs each one watches, and when a fresh one enumerates.

NVML enumerates GPUs at nvmlInit; a GPU bound to ``nvidia`` later is found only by a fresh
init. A fresh init inside the worker that watches the other GPUs would first have to shut NVML
down, which frees their handles and event sets: an XID that came meanwhile would be lost (NVML
queues an event only for the sets registered when it happens), and their statistics reads would
fail. So a GPU that its worker does not find goes to a new worker, whose nvmlInit comes after the
GPU was bound, and the GPUs already watched stay with the worker that watches them. They are not
handed over: two workers' event streams cannot be lined up (NVML's events carry no time or
sequence number), so a hand-over would lose or double an XID that came during it.

New GPUs go to the newest worker. A worker that watches nothing while a newer one runs is ended,
and so is every worker once no GPU is bound to ``nvidia`` at all (a driver is unloaded only when
no process holds NVML); the next GPU bound starts a fresh one. A GPU that a worker started after
it was bound does not find either is not NVML's to watch: that is said once, and a fresh
enumeration is tried again after RETRY_DELAYS[0], twice as long each time, up to RETRY_DELAYS[1].
At most MAX_WORKERS run at once; a GPU that would need one more waits for the next retry.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable

import attrs
import trio

from monitor.core.events import Event, NvmlUnreachable
from monitor.sources.nvml_worker.pipe import NotFound

log = logging.getLogger("monitor.sources.nvml")

RETRY_DELAYS = (5.0, 300.0)  # a GPU no fresh enumeration finds: the first wait, and the longest
MAX_WORKERS = 4  # each is a process with NVML loaded (about 28 MiB)


@attrs.define(eq=False)
class Slot:
    """One worker process (restarted if it dies) and the GPUs it is to watch."""

    assigned: dict[str, int]  # address -> PCI recoveries (nvml_targets)
    started: float  # when its process was last started, or before (its nvmlInit is later)
    ended: bool = False
    changed: trio.Event = attrs.Factory(trio.Event)

    def update(self, assigned: dict[str, int]) -> None:
        if assigned != self.assigned:
            self.assigned = assigned
            self.changed.set()

    def end(self) -> None:
        self.ended = True
        self.changed.set()


class Pool:
    """Decides which worker watches which GPU; ``start`` runs a new worker for a slot."""

    def __init__(
        self, send: Callable[[tuple[Event, ...]], Awaitable[None]], start: Callable[[Slot], None]
    ) -> None:
        self._send = send
        self._start = start
        self.slots: list[Slot] = []  # oldest first; the last takes new GPUs
        self.targets: dict[str, int] = {}
        self.bound: dict[str, float] = {}  # target -> when it became one (-inf: before we ran)
        self.waiting: dict[str, float] = {}  # not found by a fresh enumeration: when to retry
        self.delays: dict[str, float] = {}  # the next wait of each GPU that was not found
        self.lost: set[str] = set()  # said to be lost, until NVML reads it
        self.wake = trio.Event()  # set when a retry is scheduled, or the targets change
        self._first = True

    def _new_slot(self, assigned: dict[str, int], now: float) -> Slot:
        slot = Slot(assigned, started=now)
        self.slots.append(slot)
        self._start(slot)
        return slot

    def set_targets(self, targets: dict[str, int], now: float) -> None:
        """The GPUs to watch now (``nvml_targets``): new ones go to the newest worker."""
        had = bool(self.targets)
        for address in targets:
            # GPUs bound before the daemon ran are in every worker's enumeration
            self.bound.setdefault(address, -math.inf if self._first else now)
        self._first = False
        for address in [a for a in self.bound if a not in targets]:
            del self.bound[address]
            self.waiting.pop(address, None)
            self.delays.pop(address, None)
            self.lost.discard(address)
        self.targets = dict(targets)
        if had and not targets:
            for slot in self.slots:  # no GPU on nvidia: let NVML go, the driver may be unloaded
                slot.end()
            self.slots.clear()
        for slot in self.slots:
            slot.update({a: targets[a] for a in slot.assigned if a in targets})
        owned = {a for slot in self.slots for a in slot.assigned}
        new = {a: r for a, r in targets.items() if a not in owned and a not in self.waiting}
        if new and self.slots:
            self.slots[-1].update({**self.slots[-1].assigned, **new})
        elif new:
            self._new_slot(new, now)
        self._end_idle()

    def _end_idle(self) -> None:
        """End the workers that watch nothing, but the newest (it takes the next GPU)."""
        for slot in self.slots[:-1]:
            if not slot.assigned:
                slot.end()
        self.slots = [s for s in self.slots if not s.ended]

    def _take(self, slot: Slot, address: str) -> int:
        resets = slot.assigned[address]
        slot.update({a: r for a, r in slot.assigned.items() if a != address})
        return resets

    def seen(self, address: str) -> None:
        """NVML read this GPU: it is watched."""
        self.lost.discard(address)
        self.delays.pop(address, None)

    async def not_found(self, slot: Slot, found: NotFound, now: float) -> None:
        """A worker's NVML does not hold this GPU: a fresh enumeration, or say why not."""
        address = found.address
        if slot.ended or address not in slot.assigned or address not in self.bound:
            return  # moved or gone meanwhile
        if slot.started >= self.bound[address]:
            # this worker enumerated after the GPU was bound: a lost GPU stays with it (retried
            # there, as any GPU NVML cannot reach), and one not found is not NVML's to watch
            if found.lost:
                reason = f"GPU has fallen off the bus ({found.reason})"
                if address not in self.lost:
                    self.lost.add(address)
                    log.error("%s: %s", address, reason)
                await self._send((NvmlUnreachable(address, reason, lost=True),))
            else:
                await self._give_up(slot, address, found, now)
            return
        newest = self.slots[-1]
        if newest is not slot and newest.started >= self.bound[address]:
            newest.update({**newest.assigned, address: self._take(slot, address)})
        elif len(self.slots) < MAX_WORKERS:
            log.info("%s: not in NVML's enumeration; starting a fresh one", address)
            self._new_slot({address: self._take(slot, address)}, now)
        else:
            await self._give_up(slot, address, found, now)
        self._end_idle()

    async def _give_up(self, slot: Slot, address: str, found: NotFound, now: float) -> None:
        first = address not in self.delays
        delay = self.delays.get(address, RETRY_DELAYS[0])
        self.delays[address] = min(delay * 2, RETRY_DELAYS[1])
        self.waiting[address] = now + delay
        self.wake.set()
        self._take(slot, address)
        self._end_idle()
        reason = f"NVML cannot watch this GPU: NVML does not find it ({found.reason})"
        # said once; each later try that fails again only at debug level
        log.log(
            logging.ERROR if first else logging.DEBUG,
            "%s: %s; trying a fresh enumeration in %g s, then less and less often",
            address,
            reason,
            delay,
        )
        await self._send((NvmlUnreachable(address, reason),))

    def retry_due(self, now: float) -> float:
        """Give the GPUs whose wait is over a fresh enumeration; when the next one is due."""
        due = {a: self.targets[a] for a, at in self.waiting.items() if at <= now}
        if due and len(self.slots) < MAX_WORKERS:
            for address in due:
                del self.waiting[address]
                self.bound[address] = now  # the worker started now enumerates after it
            self._new_slot(due, now)
        elif due:
            for address in due:  # no room for one more worker: the next try
                self.waiting[address] = now + self.delays[address]
        return min(self.waiting.values(), default=math.inf)

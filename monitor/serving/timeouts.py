"""Closing connections that stay quiet too long, with one task for all of them.

A deadline per connection would be a trio cancel scope per read and per notification, and trio
keeps each on its deadline heap until it would have fired, long after the read finished or the
connection closed: a thousand subscribers that come and go leave a thousand of them behind for a
minute, scattered through memory that the allocator then cannot give back (tests/bench,
scenario 4). Here a connection says it is waiting (``watch``); one task looks every
``CHECK_SECONDS`` while any is, and times out those overdue; none watched, it sleeps.
"""

from __future__ import annotations

from typing import Protocol

import trio

CHECK_SECONDS = 1.0  # how late, at most, a timeout comes


class Waiting(Protocol):
    def overdue(self, now: float) -> str | None:
        """Why it has waited too long (a phrase: "sent nothing"), or None."""

    def time_out(self, why: str) -> None: ...


class Timeouts:
    def __init__(self) -> None:
        self._watched: dict[Waiting, None] = {}
        self._someone = trio.Event()

    def watch(self, waiting: Waiting) -> None:
        self._watched[waiting] = None
        self._someone.set()

    def unwatch(self, waiting: Waiting) -> None:
        self._watched.pop(waiting, None)

    async def run(self) -> None:
        while True:
            await self._someone.wait()
            self._someone = trio.Event()
            while self._watched:
                await trio.sleep(CHECK_SECONDS)
                now = trio.current_time()
                for waiting in list(self._watched):
                    why = waiting.overdue(now)
                    if why is not None:
                        self.unwatch(waiting)
                        waiting.time_out(why)

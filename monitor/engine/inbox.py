"""What the reducer task takes in: batches of events from the sources, and clients' requests,
each waiting for its answer."""

from __future__ import annotations

import trio

from monitor.core.answers import Answer
from monitor.core.events import Event, Request
from monitor.sources.counts import Received


class Pending:
    """A request waiting for the reducer task's answer."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.answer: Answer | None = None
        self.done = trio.Event()


Item = tuple[Event, ...] | Received | Pending
Inbox = trio.MemorySendChannel[Item]
InboxReader = trio.MemoryReceiveChannel[Item]  # the receiving end: the reducer task reads it


async def ask(inbox: Inbox, request: Request) -> Answer:
    """Hand a request to the reducer task and wait for its decision."""
    pending = Pending(request)
    try:  # no scheduler round trip when there is room: waiting for the answer yields anyway
        inbox.send_nowait(pending)
    except trio.WouldBlock:
        await inbox.send(pending)
    await pending.done.wait()
    assert pending.answer is not None
    return pending.answer

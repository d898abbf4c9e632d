"""One client connection: request lines in, answers out, and notifications once it subscribes.

A reader answers each request line in order and, once the connection subscribes, a writer task
drains its subscriber buffer; a per-connection lock keeps their lines whole. Whatever a client
sends, the worst it gets is an error and a closed connection: nothing it does reaches the daemon
or another client. What a request means is the request table's to say
(``monitor.serving.requests``); the server's ``dispatch`` waits for its answer.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Protocol

import trio

from monitor.core.access import Peer
from monitor.engine.hub import Hub, Subscriber
from monitor.engine.stats import StatsHub
from monitor.serving.limits import ConnectionLimits
from monitor.serving.timeouts import Timeouts
from monitor.wire.errors import INTERNAL_ERROR, INVALID_REQUEST, SERVER_BUSY, RpcError
from monitor.wire.framing import (
    LineBuffer,
    LineTooLong,
    Request,
    encode_error,
    encode_raw_notification,
    encode_raw_result,
    parse_request,
)

log = logging.getLogger(__name__)

RECEIVE_SIZE = 64 * 1024
LINGER_SECONDS = 2.0  # how long a refused client may go on sending before we close on it
# Unfinished lines across all connections. Each may be up to 1 MiB, but a thousand clients each
# sending most of one and stopping would hold a gigabyte (tests/daemon/test_abuse.py).
UNFINISHED_INPUT_BUDGET = 64 * 1024 * 1024


class UnfinishedInput:
    """Bytes of unfinished lines held, all connections together, against one budget."""

    def __init__(self, budget: int = UNFINISHED_INPUT_BUDGET) -> None:
        self.budget = budget
        self.held = 0

    def hold(self, size: int) -> bool:
        """Hold ``size`` more bytes, if the budget allows."""
        if self.held + size > self.budget:
            return False
        self.held += size
        return True

    def take(self, size: int) -> None:
        self.held -= size


class Host(Protocol):
    """What a connection needs of the server it belongs to."""

    hub: Hub
    limits: ConnectionLimits
    requests_per_second: float
    unfinished: UnfinishedInput
    timeouts: Timeouts

    async def dispatch(self, request: Request, connection: Connection) -> bytes | None: ...


class RequestBudget:
    """A token bucket: bursts up to a second's worth of requests, then ``rate`` per second."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.last: float | None = None

    def wait_before_next(self, now: float) -> float:
        """Take a token for one request; the seconds to wait before answering it."""
        if self.last is not None:
            self.tokens = min(self.rate, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= 1
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class Connection:
    """One client: its requests answered in order, and its notifications once it subscribes."""

    def __init__(self, server: Host, stream: trio.SocketStream, number: int, peer: Peer) -> None:
        self.server = server
        self.stream = stream
        self.number = number
        self.peer = peer
        self.bound_leases = False  # whether a lease ends when this connection closes
        self.budget = RequestBudget(server.requests_per_second)
        self.send_lock = trio.Lock()
        self.subscriber: Subscriber | None = None
        self.streams_stats = False  # whether it gets stats notifications
        self.nursery: trio.Nursery | None = None
        self.pumping: trio.CancelScope | None = None  # the notification writer's, once subscribed
        # What the timeouts look at (``overdue``): when it last finished something, when its
        # unfinished line began, the read it waits in, and since when a notification is stuck.
        self.active = self.line_begun = 0.0
        self.pending_line = False
        self.reading: trio.CancelScope | None = None
        self.timed_out: str | None = None
        self.sending_since: float | None = None
        self._waits = 0  # reads and sends now watched by the timeouts

    async def send(self, data: bytes) -> None:
        # The lock is free but while a notification is written, so take it without the
        # scheduler round trip of ``acquire``: ``send_all`` is this request's checkpoint.
        try:
            self.send_lock.acquire_nowait()
        except trio.WouldBlock:
            await self.send_lock.acquire()
        try:
            await self.stream.send_all(data)
        finally:
            self.send_lock.release()

    async def refuse(self, error: RpcError, linger: bool = True) -> None:
        with trio.move_on_after(1):
            await self.send(encode_error(error))
        if linger:
            await self._linger()
        else:
            await self.stream.send_eof()
            with contextlib.suppress(OSError):  # unread data at close would reset the client
                while os.read(self.stream.socket.fileno(), RECEIVE_SIZE):
                    pass

    async def run(self) -> None:
        buffer = LineBuffer()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            try:
                refusal = await self._answer_lines(buffer)
                if refusal is not None:
                    await self.send(encode_error(refusal))
                    await self._linger()
            finally:
                self.server.unfinished.take(buffer.pending)
                if self.pumping is not None:
                    self.pumping.cancel()
                if self.streams_stats:
                    nursery.cancel_scope.cancel()
                if self.subscriber is not None:
                    self.server.hub.unsubscribe(self.subscriber)

    async def _answer_lines(self, buffer: LineBuffer) -> RpcError | None:
        """Answer each request line until EOF; the error to close with, if the client is refused.

        Returns before the refusal is sent, so that no received data is held while we linger."""
        self.active = self.line_begun = trio.current_time()
        while True:
            data = await self._read(buffer)
            if data is None:
                timeout = self.server.limits.timeout
                return RpcError(
                    SERVER_BUSY, f"This connection {self.timed_out} for {timeout:g} s; closing."
                )
            if not data:
                return None
            had_pending = buffer.pending
            try:
                lines = self._take_lines(buffer, data)
            except RpcError as refusal:
                return refusal.with_traceback(None)  # its frames would keep ``data`` alive
            for line in lines:
                if line.strip():
                    wait = self.budget.wait_before_next(trio.current_time())
                    if wait > 0:
                        await trio.sleep(wait)
                    await self.answer(line)
            self.active = trio.current_time()
            self.pending_line = bool(buffer.pending)
            if buffer.pending and (lines or not had_pending):
                self.line_begun = self.active

    async def _read(self, buffer: LineBuffer) -> bytes | None:
        """What the client sends next (empty at EOF); None if it waited too long to."""
        quiet_allowed = self.subscriber is not None or self.bound_leases or self.streams_stats
        watched = bool(buffer.pending) or not quiet_allowed
        with trio.CancelScope() as self.reading:
            if watched:
                self._watch(+1)
            try:
                return await self.stream.receive_some(RECEIVE_SIZE)
            finally:
                if watched:
                    self._watch(-1)
                self.reading = None
        return None  # cancelled by the timeouts

    def overdue(self, now: float) -> str | None:
        timeout = self.server.limits.timeout
        if self.sending_since is not None and now - self.sending_since >= timeout:
            return "stopped reading"
        if self.reading is not None:
            if self.pending_line and now - self.line_begun >= timeout:
                return "finished no request line"
            if not self.pending_line and now - self.active >= timeout:
                return "sent nothing"
        return None

    def time_out(self, why: str) -> None:
        if why == "stopped reading":
            uid, pid = self.peer.uid, self.peer.pid
            log.info("closing a subscriber that stopped reading (uid %d, pid %d)", uid, pid)
            assert self.nursery is not None
            self.nursery.cancel_scope.cancel()
        elif self.reading is not None:
            self.timed_out = why
            self.reading.cancel()

    def _watch(self, step: int) -> None:
        before, self._waits = self._waits, self._waits + step
        if before == 0:
            self.server.timeouts.watch(self)
        elif self._waits == 0:
            self.server.timeouts.unwatch(self)

    async def _notify(self, message: bytes) -> None:
        """Send a notification; a client that reads none for the timeout is closed."""
        self.sending_since = trio.current_time()
        self._watch(+1)
        try:
            await self.send(message)
        finally:
            self._watch(-1)
            self.sending_since = None

    def _take_lines(self, buffer: LineBuffer, data: bytes) -> list[bytes]:
        """The lines ``data`` completes; RpcError, and the unfinished line dropped, when the
        connection is to be refused for the length of its line or for the daemon's memory."""
        unfinished = self.server.unfinished
        unfinished.take(buffer.pending)
        try:
            lines = buffer.feed(data)
        except LineTooLong:
            buffer.clear()
            raise RpcError(INVALID_REQUEST, "Request line exceeds 1 MiB; closing.") from None
        if buffer.pending and not unfinished.hold(buffer.pending):
            buffer.clear()
            raise RpcError(
                SERVER_BUSY,
                "The daemon holds too much unfinished input from clients; send whole lines. "
                "Closing.",
            )
        return lines

    async def _linger(self) -> None:
        """Close our side, then read and drop what the client still sends, for a while.

        Closing a socket that has unread data resets it, and the client would lose the error
        line we just wrote; once the client has read it and closed, EOF ends this."""
        await self.stream.send_eof()
        with trio.move_on_after(LINGER_SECONDS):
            while await self.stream.receive_some(RECEIVE_SIZE):
                pass

    async def answer(self, line: bytes) -> None:
        try:
            request = parse_request(line)
        except RpcError as error:
            await self.send(encode_error(error))
            return
        if request.is_notification:
            return  # JSON-RPC: never answer a notification; none of our methods is one
        try:
            response = await self.server.dispatch(request, self)
        except RpcError as error:
            error.request_id = request.id
            response = encode_error(error)
        except Exception:
            log.exception("internal error answering %s", request.method)
            response = encode_error(RpcError(INTERNAL_ERROR, "Internal error.", None, request.id))
        if response is not None:
            await self.send(response)

    async def subscribe(self, request: Request) -> None:
        """Answer with the snapshot, then start writing the changes that follow it."""
        if self.subscriber is not None:
            raise RpcError(INVALID_REQUEST, "This connection is already subscribed.")
        hub = self.server.hub
        # Registered in the same step as the snapshot is taken: the first patch's base is it.
        self.subscriber = hub.subscribe()
        await self.send(encode_raw_result(request.id, hub.snapshot_result()))
        assert self.nursery is not None
        self.pumping = trio.CancelScope()  # made here: the connection may end before it runs
        self.nursery.start_soon(self._pump, self.subscriber)

    async def stream_stats(self, request: Request, interval: float, stats: StatsHub) -> None:
        """Answer with a sample, then send one every ``interval`` seconds until it closes."""
        if self.streams_stats:
            raise RpcError(INVALID_REQUEST, "This connection already receives stats.")
        self.streams_stats = True
        first = await stats.sample()
        await self.send(encode_raw_result(request.id, first.encoded))
        assert self.nursery is not None
        self.nursery.start_soon(stats.stream, interval, self._send_stats, trio.current_time())

    async def _send_stats(self, params: bytes) -> None:
        await self._notify(encode_raw_notification("stats", params))

    async def _pump(self, subscriber: Subscriber) -> None:
        """Write notifications as they come, until the connection ends (``run``)."""
        # Ended by its own scope, so that the connection's nursery closes without a Cancelled
        # to split out of an exception group: that split leaves a string in CPython's type
        # cache per connection, each pinning a heap page after a burst of subscribers.
        assert self.pumping is not None
        with self.pumping:
            while True:
                await self._notify(await subscriber.next_message(self.server.hub))

"""The exporter's HTTP server: trio streams, HTTP/1.1 by ``h11`` (sans-I/O), keep-alive.

It serves GET and HEAD of a few fixed pages and nothing else. Anyone on the network it listens
on may connect, so every limit is explicit: request heads of at most MAX_HEAD bytes, bodies
(which no page reads) of at most MAX_BODY, MAX_CONNECTIONS at once (``Server``), and a
connection that sends nothing for IDLE_TIMEOUT seconds, takes longer than the head timeout
(HEAD_TIMEOUT unless told) to finish a request's head once begun, or REQUEST_TIMEOUT over a
whole request, or reads its answer slower than SEND_TIMEOUT, is closed. A connection is
"waiting" from the end of its last answer (or its start) until its next request is complete:
a waiting connection holds a slot only until someone needs it (``Server.handle``), so clients
that dribble bytes (slowloris) cannot lock a scrape out.
"""

from __future__ import annotations

import contextlib
import http
import logging
from collections.abc import Callable, Sequence
from functools import partial

import attrs
import h11
import trio

log = logging.getLogger("hotplug-monitor.exporter")

MAX_HEAD = 16 * 1024
MAX_BODY = 64 * 1024
MAX_CONNECTIONS = 64
IDLE_TIMEOUT = 60.0  # seconds: Prometheus's connections are idle between scrapes
HEAD_TIMEOUT = 2.0  # from a request's first byte to the end of its head
REQUEST_TIMEOUT = 10.0  # from a request's first byte to its end
SEND_TIMEOUT = 10.0
RECEIVE_SIZE = 16 * 1024
LINGER_SECONDS, LINGER_BYTES = 1.0, 256 * 1024  # after an error answer (see _linger)
SERVER = "hotplug-monitor-exporter"
METHODS = ("GET", "HEAD")


@attrs.frozen
class Page:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


Site = Callable[[str], Page]  # the path (no query) -> the page


def answer(site: Site, method: str, target: str) -> Page:
    """What a request gets: the site's page, or why not."""
    if method not in METHODS:
        return Page(
            405, b"method not allowed: GET or HEAD only\n", headers=(("Allow", "GET, HEAD"),)
        )
    path = target.split("?", 1)[0]
    return site(path)


def _reason(status: int) -> str:
    return http.HTTPStatus(status).phrase


class _Close(Exception):
    """Stop serving this connection (the peer left, broke the protocol, or was too slow)."""


class Connection:
    """One client connection, one request at a time, kept open between them."""

    def __init__(
        self, stream: trio.abc.Stream, site: Site, head_timeout: float = HEAD_TIMEOUT
    ) -> None:
        self.stream = stream
        self.site = site
        self.head_timeout = head_timeout
        # h11 refuses an incomplete head longer than this; ``_event`` never lets a complete one
        # grow past MAX_HEAD either (h11 checks only incomplete heads).
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD - 1)
        # Set while waiting for a complete request: the scope that ends the wait, and since when.
        self.waiting: trio.CancelScope | None = None
        self.waiting_since = 0.0
        self._began: float | None = None  # when this request's first byte came

    async def serve(self) -> None:
        try:
            while True:
                self._began = None
                with trio.move_on_after(IDLE_TIMEOUT) as wait:
                    self.waiting, self.waiting_since = wait, trio.current_time()
                    request = await self._request()
                self.waiting = None
                if wait.cancelled_caught or request is None:
                    return
                method, target = request
                await self._send_page(method, answer(self.site, method, target))
                if self.conn.our_state is not h11.DONE or self.conn.their_state is not h11.DONE:
                    return
                self.conn.start_next_cycle()
        except h11.RemoteProtocolError as error:
            await self._refuse(error.error_status_hint, f"bad request: {error}")
        except _Close:
            return

    async def _event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            size = RECEIVE_SIZE
            if self.conn.their_state is h11.IDLE:  # a head: never more than MAX_HEAD buffered
                size = max(1, MAX_HEAD - len(self.conn.trailing_data[0]))
            try:
                data = await self.stream.receive_some(size)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
                raise _Close from error
            if self.waiting is not None and data and self._began is None:
                # A request began: its head has head_timeout to arrive, the rest longer.
                self._began = trio.current_time()
                self.waiting.deadline = self._began + self.head_timeout
            self.conn.receive_data(bytes(data))

    async def _request(self) -> tuple[str, str] | None:
        """The next request's method and target, its body read and dropped; None when the
        client closed the connection."""
        event = await self._event()
        if isinstance(event, h11.ConnectionClosed):
            return None
        if not isinstance(event, h11.Request):
            raise _Close
        if self.waiting is not None:  # the head is in (pipelined ones came with no wait)
            began = trio.current_time() if self._began is None else self._began
            self.waiting.deadline = began + REQUEST_TIMEOUT
        method, target = (
            event.method.decode("ascii", "replace"),
            event.target.decode("ascii", "replace"),
        )
        body = 0
        while not isinstance(event := await self._event(), h11.EndOfMessage):
            if isinstance(event, h11.Data):
                body += len(event.data)
                if body > MAX_BODY:
                    await self._refuse(413, "request body too large")
                    raise _Close
            elif isinstance(event, h11.ConnectionClosed):
                return None
        return method, target

    async def _send_page(self, method: str, page: Page) -> None:
        headers = [
            ("Server", SERVER),
            ("Content-Type", page.content_type),
            ("Content-Length", str(len(page.body))),
            *page.headers,
        ]
        events: list[h11.Event] = [
            h11.Response(status_code=page.status, headers=headers, reason=_reason(page.status))
        ]
        if method != "HEAD":
            events.append(h11.Data(data=page.body))
        events.append(h11.EndOfMessage())
        await self._send(events)

    async def _refuse(self, status: int, why: str) -> None:
        """An error answer, then the connection closes (if the state still allows one)."""
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = f"{why}\n".encode()
        headers = [
            ("Server", SERVER),
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]
        with contextlib.suppress(_Close, h11.LocalProtocolError):
            await self._send(
                [
                    h11.Response(status_code=status, headers=headers, reason=_reason(status)),
                    h11.Data(data=body),
                    h11.EndOfMessage(),
                ]
            )
            await self._linger()

    async def _linger(self) -> None:
        """Read (and drop) what the client is still sending, for a moment, before closing:
        closing with unread data makes the kernel reset the connection, and the client would
        lose the answer that says why."""
        if isinstance(self.stream, trio.SocketStream):
            with contextlib.suppress(OSError, trio.BrokenResourceError):
                await self.stream.send_eof()
        left = LINGER_BYTES
        with trio.move_on_after(LINGER_SECONDS):
            while left > 0:
                try:
                    data = await self.stream.receive_some(RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                if not data:
                    return
                left -= len(data)

    async def _send(self, events: Sequence[h11.Event]) -> None:
        data = b"".join(self.conn.send(event) or b"" for event in events)
        with trio.move_on_after(SEND_TIMEOUT) as slow:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
                raise _Close from error
        if slow.cancelled_caught:
            raise _Close


class Server:
    """Connections to the site, at most MAX_CONNECTIONS at once. When they are all open, a new
    one closes the one that has waited longest without a complete request, idle or dribbling
    (a client can reconnect, and connections that hold a slot without asking cannot lock out a
    scrape); when every one is being answered, the new one is answered 503."""

    def __init__(
        self,
        site: Site,
        max_connections: int = MAX_CONNECTIONS,
        head_timeout: float = HEAD_TIMEOUT,
    ) -> None:
        if not head_timeout > 0:
            raise ValueError(f"the head timeout must be a positive number, not {head_timeout}")
        self.site = site
        self.max_connections = max_connections
        self.head_timeout = head_timeout
        self.connections: dict[Connection, None] = {}

    @property
    def open(self) -> int:
        return len(self.connections)

    def _evict(self) -> bool:
        waiting = (c for c in self.connections if c.waiting is not None)
        longest = min(waiting, key=lambda c: c.waiting_since, default=None)
        if longest is None or longest.waiting is None:
            return False
        longest.waiting.cancel()
        longest.waiting = None
        return True

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            connection = Connection(stream, self.site, self.head_timeout)
            if self.open >= self.max_connections and not self._evict():
                await connection._refuse(503, "too many connections")
                return
            self.connections[connection] = None
            try:
                await connection.serve()
            finally:
                del self.connections[connection]


async def listen(host: str, port: int) -> list[trio.SocketListener]:
    """Listening sockets on every address ``host`` resolves to (``localhost``: IPv4 and IPv6)."""
    return await trio.open_tcp_listeners(port, host=host or None)


async def serve(
    server: Server,
    listeners: list[trio.SocketListener],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(trio.serve_listeners, server.handle, listeners))
        task_status.started()

"""The socket protocol from trio code: calls answered in any order, notifications on a bounded
channel, and ``follow`` to keep a snapshot through daemon restarts."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NoReturn

import trio

from monitor.wire.backoff import Backoff
from monitor.wire.blocking import RECEIVE_SIZE, connect_error
from monitor.wire.errors import DaemonUnavailable
from monitor.wire.follow import Emit, follow_with
from monitor.wire.framing import ClientProtocol, Notification, ProtocolError, Response
from monitor.wire.requests import Call

NOTIFICATION_BUFFER = 16


class TrioClient:
    def __init__(self, path: Path, stream: trio.SocketStream) -> None:
        self.path = path
        self._stream = stream
        self._protocol = ClientProtocol()
        self._answers: dict[int | str | None, Response] = {}
        self._answered = trio.lowlevel.ParkingLot()
        self._closed: DaemonUnavailable | None = None
        self._send, self._notifications = trio.open_memory_channel[Notification](
            NOTIFICATION_BUFFER
        )
        self._lock = trio.Lock()

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, path: Path) -> AsyncIterator[TrioClient]:
        """A connection to the daemon at ``path``, read by a task of its own while it is open."""
        try:
            stream = await trio.open_unix_socket(str(path))
        except OSError as exc:
            raise connect_error(path, exc) from None
        client = cls(path, stream)
        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(client._read)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()

    async def _read(self) -> None:
        try:
            while data := await self._stream.receive_some(RECEIVE_SIZE):
                for message in self._protocol.receive(data):
                    if isinstance(message, Response):
                        self._answers[message.id] = message
                        self._answered.unpark_all()
                    else:
                        await self._send.send(message)  # a reader that lags holds the socket
            self._closed = DaemonUnavailable(f"the daemon on {self.path} closed the connection")
        except (trio.BrokenResourceError, ProtocolError) as exc:
            self._closed = DaemonUnavailable(f"the connection to {self.path} broke: {exc}")
        finally:
            self._answered.unpark_all()
            await self._send.aclose()

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """The method's result; ``RpcError`` if refused, ``DaemonUnavailable`` if it is gone."""
        request_id, data = self._protocol.request(method, params)
        async with self._lock:  # whole lines
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise DaemonUnavailable(f"the connection to {self.path} broke: {exc}") from None
        while request_id not in self._answers:
            if self._closed is not None:
                raise self._closed
            await self._answered.park()
        return self._answers.pop(request_id).value()

    async def ask(self, call: Call) -> Any:
        return await self.call(call.method, call.params)

    async def messages(self) -> AsyncIterator[Notification]:
        """Each notification as it comes; ``DaemonUnavailable`` once the connection ends."""
        async for message in self._notifications:
            yield message
        assert self._closed is not None
        raise self._closed


async def follow(path: Path, emit: Emit, backoff: Backoff | None = None) -> NoReturn:
    """Hand ``emit`` the daemon's snapshot now and after every change, through restarts; None
    while the daemon cannot be reached (``monitor.wire.follow``)."""
    await follow_with(TrioClient.open, trio.sleep, path, emit, backoff)

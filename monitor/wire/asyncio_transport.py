"""The socket protocol from asyncio code (gRPC servers are asyncio): calls answered in any
order, notifications on a bounded queue, and ``follow`` to keep a snapshot through restarts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NoReturn

from monitor.wire.backoff import Backoff
from monitor.wire.blocking import RECEIVE_SIZE, connect_error
from monitor.wire.errors import DaemonUnavailable
from monitor.wire.follow import Emit, follow_with
from monitor.wire.framing import ClientProtocol, Notification, ProtocolError, Response
from monitor.wire.requests import Call

NOTIFICATION_BUFFER = 16


class AsyncioClient:
    def __init__(self, path: Path, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.path = path
        self._reader = reader
        self._writer = writer
        self._protocol = ClientProtocol()
        self._waiting: dict[int | str | None, asyncio.Future[Response]] = {}
        self._notifications: asyncio.Queue[Notification | DaemonUnavailable] = asyncio.Queue(
            NOTIFICATION_BUFFER
        )
        self._closed: DaemonUnavailable | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, path: Path) -> AsyncIterator[AsyncioClient]:
        """A connection to the daemon at ``path``, read by a task of its own while it is open."""
        try:
            reader, writer = await asyncio.open_unix_connection(str(path), limit=RECEIVE_SIZE)
        except OSError as exc:
            raise connect_error(path, exc) from None
        client = cls(path, reader, writer)
        task = asyncio.create_task(client._read())
        try:
            yield client
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _read(self) -> None:
        try:
            while data := await self._reader.read(RECEIVE_SIZE):
                for message in self._protocol.receive(data):
                    if isinstance(message, Response):
                        future = self._waiting.pop(message.id, None)
                        if future is not None and not future.done():
                            future.set_result(message)
                    else:
                        await self._notifications.put(message)  # a reader that lags holds it
            self._closed = DaemonUnavailable(f"the daemon on {self.path} closed the connection")
        except (OSError, ProtocolError) as exc:
            self._closed = DaemonUnavailable(f"the connection to {self.path} broke: {exc}")
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(self._closed)
        await self._notifications.put(self._closed)

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """The method's result; ``RpcError`` if refused, ``DaemonUnavailable`` if it is gone."""
        if self._closed is not None:
            raise self._closed
        request_id, data = self._protocol.request(method, params)
        future = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            self._writer.write(data)  # one write per line: lines stay whole
            await self._writer.drain()
        except OSError as exc:  # it hung up before our reader saw the end
            self._waiting.pop(request_id, None)
            raise DaemonUnavailable(f"the connection to {self.path} broke: {exc}") from None
        return (await future).value()

    async def ask(self, call: Call) -> Any:
        return await self.call(call.method, call.params)

    async def messages(self) -> AsyncIterator[Notification]:
        """Each notification as it comes; ``DaemonUnavailable`` once the connection ends."""
        while True:
            message = await self._notifications.get()
            if isinstance(message, DaemonUnavailable):
                raise message
            yield message


async def follow(path: Path, emit: Emit, backoff: Backoff | None = None) -> NoReturn:
    """Hand ``emit`` the daemon's snapshot now and after every change, through restarts; None
    while the daemon cannot be reached (``monitor.wire.follow``)."""
    await follow_with(AsyncioClient.open, asyncio.sleep, path, emit, backoff)

"""Keeping a snapshot of the daemon's devices through its restarts, over any async transport."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, NoReturn, Protocol

from monitor.wire.backoff import Backoff
from monitor.wire.errors import DaemonUnavailable
from monitor.wire.framing import Notification
from monitor.wire.mirror import Gap, Mirror
from monitor.wire.requests import Call, subscribe


class AsyncClient(Protocol):
    async def ask(self, call: Call) -> Any: ...
    def messages(self) -> AsyncIterator[Notification]: ...


Emit = Callable[[Mirror | None], Awaitable[Any]]


async def follow_with(
    open_client: Callable[[Path], AbstractAsyncContextManager[AsyncClient]],
    sleep: Callable[[float], Awaitable[Any]],
    path: Path,
    emit: Emit,
    backoff: Backoff | None = None,
) -> NoReturn:
    """Hand ``emit`` the daemon's snapshot now and after every change, through restarts:
    ``None`` when the daemon cannot be reached (once per outage), then a fresh snapshot when it
    can again. Runs until cancelled; ``emit`` is awaited, so a slow one slows the reading."""
    backoff = backoff or Backoff()
    down = False
    while True:
        try:
            async with open_client(path) as client:
                mirror = Mirror(await client.ask(subscribe()))
                backoff.reset()
                down = False
                await emit(mirror)
                async for message in client.messages():
                    if message.method == "fingerprint":
                        mirror.apply(message.params)
                        await emit(mirror)
        except* (DaemonUnavailable, Gap, OSError):  # trio's nursery hands them on in a group
            pass
        if not down:
            down = True
            await emit(None)
        await sleep(backoff.delay())

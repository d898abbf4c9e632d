"""The client library's transports against a real daemon: calls, notifications, and a snapshot
kept through a daemon killed and started again under the client."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import trio

from monitor.wire import asyncio_transport, trio_transport
from monitor.wire.asyncio_transport import AsyncioClient
from monitor.wire.backoff import Backoff
from monitor.wire.errors import RpcError
from monitor.wire.mirror import Mirror
from monitor.wire.requests import fingerprint, release, reserve, subscribe
from monitor.wire.trio_transport import TrioClient
from tests.conftest import Daemon
from tests.sysfs import reservable
from tests.waiting import wait_until


def reserved_by(mirror: Mirror, device: str) -> str | None:
    value: str | None = mirror.devices()[device][1].get("reserved_by")
    return value


async def test_trio_client_calls_in_any_order_and_follows_notifications(
    start_daemon: Callable[..., Daemon],
) -> None:
    devices, flags = reservable()
    daemon = start_daemon(*flags)
    async with TrioClient.open(daemon.socket) as client, TrioClient.open(daemon.socket) as other:
        mirror = Mirror(await client.ask(subscribe()))
        answers: dict[str, Any] = {}

        async def ask(name: str, call: Any) -> None:
            answers[name] = await other.ask(call)

        async with trio.open_nursery() as nursery:  # two requests in flight on one connection
            nursery.start_soon(ask, "fingerprint", fingerprint())
            nursery.start_soon(ask, "reserve", reserve([devices[0]]))
        lease = answers["reserve"]["reservation_id"]
        assert set(answers["fingerprint"]) == {"generation", "snapshot"}
        with trio.fail_after(5):
            async for message in client.messages():
                mirror.apply(message.params)
                if reserved_by(mirror, devices[0]) == lease:
                    break
        try:
            await other.ask(reserve([devices[0]]))
        except RpcError as refused:
            assert refused.code == -32003 and refused.data["device_ids"] == [devices[0]]
        else:
            raise AssertionError("a held device was reserved twice")
        assert (await other.ask(release(reservation_id=lease)))["released"] == [devices[0]]


def test_asyncio_client_calls_and_follows_notifications(
    start_daemon: Callable[..., Daemon],
) -> None:
    devices, flags = reservable()
    daemon = start_daemon(*flags)

    async def scenario() -> tuple[str, str | None]:
        async with AsyncioClient.open(daemon.socket) as client:
            mirror = Mirror(await client.ask(subscribe()))
            granted = await client.ask(reserve([devices[1]], bind="connection"))
            async with asyncio.timeout(5):
                async for message in client.messages():
                    mirror.apply(message.params)
                    if reserved_by(mirror, devices[1]) is not None:
                        break
            return granted["reservation_id"], reserved_by(mirror, devices[1])

    lease, seen = asyncio.run(scenario())
    assert seen == lease
    # bound to the closed connection: it ends once seen closed
    wait_until(
        lambda: daemon.client().call("leases") == {"leases": []},
        what="the lease to end with its connection",
        interval=0.01,
    )


async def test_trio_follow_keeps_a_snapshot_through_a_daemon_restart(
    start_daemon: Callable[..., Daemon],
) -> None:
    _, flags = reservable()
    daemon = start_daemon(*flags)
    send, updates = trio.open_memory_channel[Mirror | None](0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio_transport.follow, daemon.socket, send.send, Backoff(0.05, 0.2))
        with trio.fail_after(30):
            assert await updates.receive() is not None
            daemon.kill()
            assert await updates.receive() is None  # down: the cue to mark devices unhealthy
            again = start_daemon(*flags)
            back = await updates.receive()
        assert back is not None and back.snapshot == again.fingerprint()["snapshot"]
        nursery.cancel_scope.cancel()


def test_asyncio_follow_keeps_a_snapshot_through_a_daemon_restart(
    start_daemon: Callable[..., Daemon],
) -> None:
    _, flags = reservable()
    daemon = start_daemon(*flags)

    async def scenario() -> tuple[Mirror | None, Daemon]:
        updates: asyncio.Queue[Mirror | None] = asyncio.Queue()
        task = asyncio.create_task(
            asyncio_transport.follow(daemon.socket, updates.put, Backoff(0.05, 0.2))
        )
        try:
            async with asyncio.timeout(30):
                assert await updates.get() is not None
                daemon.kill()
                assert await updates.get() is None
                again = start_daemon(*flags)
                return await updates.get(), again
        finally:
            task.cancel()

    back, again = asyncio.run(scenario())
    assert back is not None and back.snapshot == again.fingerprint()["snapshot"]

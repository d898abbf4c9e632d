"""The exporter's HTTP server under abuse (issue 24): clients that begin requests and never
finish them (slowloris), heads that dribble, and heads past the documented limit. Real sockets;
trio's MockClock where a deadline is what is tested."""

from __future__ import annotations

import contextlib

import pytest
import trio
import trio.testing

from monitor.adapters.exporter import http
from tests.inprocess.test_exporter import http_get, opened


def ok(path: str) -> http.Page:
    return http.Page(200, b"ok\n")


async def head_answer(port: int, size: int) -> int:
    """The status answered to a GET whose head is exactly ``size`` bytes."""
    start = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: "
    head = start + b"a" * (size - len(start) - 4) + b"\r\n\r\n"
    assert len(head) == size
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(head)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    return int(data.split()[1])


@pytest.mark.usefixtures("many_fds")  # 1,000 connections, both ends in this process
@pytest.mark.parametrize("attackers", [64, 1000])
async def test_scrapes_are_answered_while_slowloris_connections_are_open(attackers: int) -> None:
    # A head timeout longer than the test: what frees a slot here is the eviction alone.
    server = http.Server(ok, head_timeout=600.0)
    listeners = await http.listen("127.0.0.1", 0)
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(http.serve, server, listeners)
        streams = []
        for _ in range(attackers):  # one byte each, and never the rest of a request
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"G")
            streams.append(stream)
        await opened(server, http.MAX_CONNECTIONS)
        answers = [await http_get(port, "/") for _ in range(25)]
        assert answers == [(200, b"ok\n")] * 25
        assert server.open <= http.MAX_CONNECTIONS
        for stream in streams:
            await stream.aclose()
        await opened(server, 0)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("head_timeout", [http.HEAD_TIMEOUT, 5.0])
async def test_a_head_must_arrive_within_the_head_timeout_however_it_dribbles(
    autojump_clock: trio.testing.MockClock, head_timeout: float
) -> None:
    server = http.Server(ok, head_timeout=head_timeout)
    listeners = await http.listen("127.0.0.1", 0)
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(http.serve, server, listeners)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        began = trio.current_time()

        async def dribble() -> None:  # a byte every half second: never idle, never done
            with (
                trio.move_on_after(3 * http.REQUEST_TIMEOUT),
                contextlib.suppress(trio.BrokenResourceError),
            ):
                while True:
                    await stream.send_all(b"G")
                    await trio.sleep(0.5)

        nursery.start_soon(dribble)
        # Closed with the dribbled bytes unread: an end of stream, or a reset.
        with trio.fail_after(http.IDLE_TIMEOUT), contextlib.suppress(trio.BrokenResourceError):
            while await stream.receive_some(1024):
                pass
        assert head_timeout <= trio.current_time() - began < head_timeout + 0.5
        nursery.cancel_scope.cancel()


async def test_a_head_past_16_kib_is_refused_and_one_of_16_kib_answered() -> None:
    server = http.Server(ok)
    listeners = await http.listen("127.0.0.1", 0)
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(http.serve, server, listeners)
        assert http.MAX_HEAD == 16 * 1024
        assert await head_answer(port, http.MAX_HEAD) == 200
        for size in (http.MAX_HEAD + 1, 20 * 1024, 32 * 1024 - 1):
            assert await head_answer(port, size) == 431
        nursery.cancel_scope.cancel()

"""The exporter in this process (trio, real sockets): against a daemon that answers nonsense or
hangs up at once, and its HTTP server's limits, under trio's MockClock where time matters."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
import trio.testing

from monitor.adapters.exporter import http, run


async def http_get(port: int, path: str = "/metrics") -> tuple[int, bytes]:
    """One request on a connection of its own: the status and the body."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


FakeDaemon = Callable[[trio.SocketStream], Awaitable[None]]


async def serve_fake(path: Path, handler: FakeDaemon, nursery: trio.Nursery) -> list[int]:
    """A Unix socket at ``path`` where ``handler`` plays the daemon; the count of connections."""
    sock = trio.socket.socket(trio.socket.AF_UNIX)
    await sock.bind(str(path))
    sock.listen(16)
    listener = trio.SocketListener(sock)
    connections = [0]

    async def each(stream: trio.SocketStream) -> None:
        connections[0] += 1
        async with stream:
            await handler(stream)

    nursery.start_soon(trio.serve_listeners, each, [listener])
    return connections


async def start_exporter(socket_path: Path, nursery: trio.Nursery) -> int:
    listeners = await http.listen("127.0.0.1", 0)
    await nursery.start(run.run, socket_path, listeners)
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def answer_nonsense(stream: trio.SocketStream) -> None:
    """Each request gets a result of the wrong shape, then a line that is not JSON."""
    pending = b""
    while data := await stream.receive_some(65536):
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            wrong: dict[str, Any] = {
                "subscribe": {"generation": "seven", "snapshot": [1, 2]},
                "stats": ["not", "a", "sample"],
                "status": 5,
            }
            result = wrong.get(request["method"])
            answer = {"jsonrpc": "2.0", "id": request["id"], "result": result}
            await stream.send_all(json.dumps(answer).encode() + b"\n")
            await stream.send_all(b"{not json\n")


async def hang_up(stream: trio.SocketStream) -> None:
    return


async def test_a_daemon_answering_nonsense_or_hanging_up_leaves_the_exporter_serving(
    tmp_path: Path,
) -> None:
    for handler in (answer_nonsense, hang_up):
        socket_path = tmp_path / f"{handler.__name__}.sock"
        async with trio.open_nursery() as nursery:
            connections = await serve_fake(socket_path, handler, nursery)
            port = await start_exporter(socket_path, nursery)
            with trio.fail_after(20):
                while connections[0] < 4:  # both connections, each tried again
                    await trio.sleep(0.05)
            status, body = await http_get(port)
            assert status == 200
            assert b"\nhotplug_monitor_up 0.0\n" in body
            assert b"hotplug_monitor_device_" not in body
            nursery.cancel_scope.cancel()


async def opened(server: http.Server, count: int) -> None:
    with trio.fail_after(10):
        while server.open != count:
            await trio.sleep(0.01)


async def test_past_the_connection_cap_the_longest_waiting_is_closed_else_503() -> None:
    big = b"x" * (64 << 20)  # more than the kernel buffers: a client that does not read stalls
    server = http.Server(
        lambda path: http.Page(200, big if path == "/big" else b"ok\n"), max_connections=2
    )
    listeners = await http.listen("127.0.0.1", 0)
    port = listeners[0].socket.getsockname()[1]

    async with trio.open_nursery() as nursery:
        await nursery.start(http.serve, server, listeners)
        idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
        await opened(server, 2)
        # Both idle: a new connection is served, and the oldest idle one is closed.
        assert await http_get(port, "/") == (200, b"ok\n")
        with trio.fail_after(10):
            assert await idle[0].receive_some(1024) == b""
        await opened(server, 1)
        # A request begun and not finished is waiting too: the longest waiting goes first.
        dribbling = await trio.open_tcp_stream("127.0.0.1", port)
        await opened(server, 2)
        for stream in (idle[1], dribbling):
            await stream.send_all(b"GET / HTTP/1.1\r\n")
        assert await http_get(port, "/") == (200, b"ok\n")
        with trio.fail_after(10):
            assert await idle[1].receive_some(1024) == b""
        await opened(server, 1)
        # Every slot answering (two clients that do not read their answers): 503.
        await dribbling.aclose()
        await opened(server, 0)
        stalled = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
        for stream in stalled:
            await stream.send_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(10):
            while server.open != 2 or any(c.waiting for c in server.connections):
                await trio.sleep(0.01)
        assert (await http_get(port, "/"))[0] == 503
        for stream in (*idle, *stalled):
            await stream.aclose()
        await opened(server, 0)
        nursery.cancel_scope.cancel()


async def test_an_idle_connection_is_closed_after_the_idle_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = http.Server(lambda path: http.Page(200, b"ok\n"))
    listeners = await http.listen("127.0.0.1", 0)
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(http.serve, server, listeners)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        began = trio.current_time()
        assert await stream.receive_some(1024) == b""  # closed by the server, having sent nothing
        assert trio.current_time() - began >= http.IDLE_TIMEOUT
        nursery.cancel_scope.cancel()


async def test_a_request_begun_must_end_within_the_request_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = http.Server(lambda path: http.Page(200, b"ok\n"))
    listeners = await http.listen("127.0.0.1", 0)
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(http.serve, server, listeners)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        # The head in time, then half of the body it announced, and then nothing.
        await stream.send_all(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        began = trio.current_time()
        await stream.send_all(b"12345")
        assert await stream.receive_some(1024) == b""
        assert http.REQUEST_TIMEOUT <= trio.current_time() - began < http.IDLE_TIMEOUT
        nursery.cancel_scope.cancel()

"""Fan-out in process with pytest-trio: the hub and server on a real Unix socket, fed by the
real reducer, so a slow subscriber can be made slow on purpose."""

from __future__ import annotations

import copy
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import json_merge_patch
import pytest
import trio
import trio.testing

from monitor.core.events import DeviceSeen, PciErrorReported, PciFacts
from monitor.core.reducer import reduce
from monitor.core.state import State
from monitor.engine.hub import Hub
from monitor.serving.limits import ConnectionLimits
from monitor.serving.server import Server
from monitor.serving.socketfile import bind_unix_socket


def server(hub: Hub, max_clients: int = 1024) -> Server:
    """A server whose requests nobody decides: these tests only read."""
    inbox, _ = trio.open_memory_channel[Any](1)
    return Server(hub, inbox, limits=ConnectionLimits(max_clients=max_clients))


def listen(path: Path) -> socket.socket:
    return bind_unix_socket(path, 0o600, None)[0]


GPU = PciFacts(
    address="0000:3b:00.0", vendor_id=0x10DE, device_id=0x2330, pci_class=0x030200, driver="nvidia"
)


class Line:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.pending = b""

    async def read(self) -> dict[str, Any]:
        while b"\n" not in self.pending:
            data = await self.stream.receive_some(65536)
            assert data, "connection closed"
            self.pending += data
        line, self.pending = self.pending.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        return message

    async def call(self, method: str) -> dict[str, Any]:
        await self.stream.send_all(
            json.dumps({"jsonrpc": "2.0", "id": 1, "method": method}).encode() + b"\n"
        )
        return await self.read()


class Harness:
    def __init__(self, hub: Hub, path: Path) -> None:
        self.hub = hub
        self.path = path
        self.state = State()

    def flip(self, healthy: bool) -> None:
        """One visible change: the GPU's PCI error state."""
        event = "SUCCESSFUL_RECOVERY" if healthy else "BEGIN_RECOVERY"
        self.state, patch = reduce(self.state, PciErrorReported(GPU.address, event, healthy))
        assert patch is not None
        self.hub.publish(self.state, patch)

    async def connect(self) -> Line:
        return Line(await trio.open_unix_socket(str(self.path)))


@pytest.fixture
async def harness(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Harness]:
    hub = Hub(subscriber_buffer=4)
    harness = Harness(hub, tmp_path / "hub.sock")
    harness.state, patch = reduce(harness.state, DeviceSeen(GPU))
    hub.publish(harness.state, patch)
    await nursery.start(server(hub).serve, listen(harness.path))
    yield harness


async def test_a_stalled_subscriber_gets_a_snapshot_and_never_slows_the_others(
    harness: Harness,
) -> None:
    stalled, live = await harness.connect(), await harness.connect()
    stalled_start = (await stalled.call("subscribe"))["result"]
    live_start = (await live.call("subscribe"))["result"]
    mirror = copy.deepcopy(live_start["snapshot"])
    generation = live_start["generation"]
    # Far more changes than the 4-message buffer plus the socket buffers hold. The live client
    # reads each one as it comes; the stalled one reads nothing.
    for i in range(3000):
        harness.flip(healthy=i % 2 == 1)
        message = await live.read()
        params = message["params"]
        assert params["base"] == generation  # no gap, no snapshot: it kept up
        mirror = json_merge_patch.merge(mirror, params["patch"])
        generation = params["generation"]
    assert generation == harness.hub.state.generation
    assert mirror == harness.hub.state.fingerprint.to_json()
    assert any(s.behind for s in harness.hub.subscribers)  # the stalled one was cut off

    # The stalled one now reads: old patches that were already in its socket, then one full
    # snapshot, and the result is the current state.
    snapshot = stalled_start["snapshot"]
    seen_generation = stalled_start["generation"]
    full = 0
    while seen_generation != harness.hub.state.generation:
        params = (await stalled.read())["params"]
        if "snapshot" in params:
            full += 1
            snapshot = params["snapshot"]
        else:
            assert params["base"] == seen_generation
            snapshot = json_merge_patch.merge(snapshot, params["patch"])
        seen_generation = params["generation"]
    assert full == 1
    assert snapshot == harness.hub.state.fingerprint.to_json()
    # and afterwards it gets patches again
    harness.flip(healthy=False)
    after = (await stalled.read())["params"]
    assert after["base"] == seen_generation and "patch" in after


async def test_subscribers_that_leave_are_forgotten(harness: Harness) -> None:
    client = await harness.connect()
    await client.call("subscribe")
    assert len(harness.hub.subscribers) == 1
    await client.stream.aclose()
    with trio.fail_after(5):
        while harness.hub.subscribers:
            await trio.sleep(0.01)


async def test_answers_wait_for_the_first_enumeration(
    tmp_path: Path, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    hub = Hub()
    await nursery.start(server(hub).serve, listen(tmp_path / "s.sock"))
    client = Line(await trio.open_unix_socket(str(tmp_path / "s.sock")))
    async with trio.open_nursery() as inner:
        answers: list[dict[str, Any]] = []

        async def ask() -> None:
            answers.append(await client.call("fingerprint"))

        inner.start_soon(ask)
        await trio.sleep(0.1)  # virtual time: it passes once every task waits
        assert answers == []  # connected, but no answer before the state is known
        state, patch = reduce(State(), DeviceSeen(GPU))
        hub.publish(state, patch)
    assert GPU.address in json.dumps(answers[0]["result"]["snapshot"])


async def test_too_many_clients_are_refused_with_an_error(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    hub = Hub()
    hub.publish(State(), None)
    await nursery.start(server(hub, max_clients=2).serve, listen(tmp_path / "s.sock"))
    first = Line(await trio.open_unix_socket(str(tmp_path / "s.sock")))
    second = Line(await trio.open_unix_socket(str(tmp_path / "s.sock")))
    assert "result" in await first.call("fingerprint")
    assert "result" in await second.call("fingerprint")
    third = Line(await trio.open_unix_socket(str(tmp_path / "s.sock")))
    refused = await third.read()
    assert refused["error"]["code"] == -32000 and "Too many clients" in refused["error"]["message"]
    assert await third.stream.receive_some(10) == b""
    await first.stream.aclose()
    with trio.fail_after(5):
        while True:  # a slot frees up once the first client is gone
            fourth = Line(await trio.open_unix_socket(str(tmp_path / "s.sock")))
            answer = await fourth.call("fingerprint")
            if "result" in answer:
                break
            await trio.sleep(0.01)


def test_a_new_state_without_a_patch_keeps_the_cached_snapshot_answer() -> None:
    hub = Hub()
    state, patch = reduce(State(), DeviceSeen(GPU))
    hub.publish(state, patch)
    cached = hub.snapshot_result()
    hub.publish(attrs.evolve(state), None)
    assert hub.snapshot_result() is cached

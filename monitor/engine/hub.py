"""The latest state, and fan-out of each change to subscribers with bounded buffers.

Only the reducer task calls ``publish``. It never waits: each subscriber has a small buffer, and
one that is full is marked behind, its backlog dropped, and it is sent a full snapshot once it
reads again. A slow client therefore costs memory for a few messages at most, and never delays
the reducer or the other clients.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import trio

from monitor.core.fingerprint import Patch
from monitor.core.state import State
from monitor.wire.framing import dumps, encode_raw_notification

SUBSCRIBER_BUFFER = 16

_SNAPSHOT_DUE = None  # queued in place of a dropped backlog


class Subscriber:
    def __init__(self, capacity: int = SUBSCRIBER_BUFFER) -> None:
        self._send, self._receive = trio.open_memory_channel[bytes | None](capacity)
        self.behind = False

    def offer(self, message: bytes) -> None:
        if self.behind:
            return
        try:
            self._send.send_nowait(message)
        except trio.WouldBlock:
            self.behind = True
            while True:
                try:
                    self._receive.receive_nowait()
                except trio.WouldBlock:
                    break
            self._send.send_nowait(_SNAPSHOT_DUE)

    async def next_message(self, hub: Hub) -> bytes:
        """The next notification to write: a queued patch, or a full snapshot after a drop."""
        message = await self._receive.receive()
        if message is _SNAPSHOT_DUE:
            self.behind = False
            return hub.snapshot_notification()
        return message


class Hub:
    def __init__(
        self, state: State | None = None, subscriber_buffer: int = SUBSCRIBER_BUFFER
    ) -> None:
        self.state = state or State()
        # Set once the first enumeration is in the state, and every GPU in it that waits for
        # NVML's name has it or has waited long enough: answers wait until then.
        self.ready = trio.Event()
        self.subscribers: set[Subscriber] = set()
        self._subscriber_buffer = subscriber_buffer
        self._snapshot_cache: tuple[int, bytes] | None = None
        self._version = 0  # grows with every change of the state or of the subscribers
        self._waiting = trio.lowlevel.ParkingLot()

    def publish(self, state: State, patch: Patch | None) -> None:
        base = self.state.generation
        if state is not self.state:
            self.state = state
            self._changed()
        if not state.naming:
            self.ready.set()
        if patch is None or not self.subscribers:  # nobody to encode it for
            return
        params = {"base": base, "generation": state.generation, "patch": patch}
        message = encode_raw_notification("fingerprint", dumps(params))
        for subscriber in self.subscribers:
            subscriber.offer(message)

    def subscribe(self) -> Subscriber:
        subscriber = Subscriber(self._subscriber_buffer)
        self.subscribers.add(subscriber)
        self._changed()
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.discard(subscriber)
        self._changed()

    def _changed(self) -> None:
        self._version += 1
        self._waiting.unpark_all()

    async def changes(self) -> AsyncIterator[State]:
        """The state now, then again after each change of it or of the subscribers. Changes
        that come while the consumer is busy are one: it gets the newest state."""
        seen = None
        while True:
            if self._version == seen:
                await self._waiting.park()
                continue
            seen = self._version
            yield self.state

    def snapshot_result(self) -> bytes:
        """``{"generation": G, "snapshot": S}`` as JSON, encoded once per generation."""
        generation = self.state.generation
        if self._snapshot_cache is None or self._snapshot_cache[0] != generation:
            snapshot = self.state.fingerprint.to_json()
            encoded = dumps({"generation": generation, "snapshot": snapshot})
            self._snapshot_cache = (generation, encoded)
        return self._snapshot_cache[1]

    def snapshot_notification(self) -> bytes:
        return encode_raw_notification("fingerprint", self.snapshot_result())

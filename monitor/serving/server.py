"""The Unix socket: one task per connection, JSON-RPC framing, subscribers fed from the hub.

Each connection has a reader (requests in, responses out) and, once it subscribes, a writer task
that drains its subscriber buffer; a per-connection lock keeps their lines whole. Whatever a
client sends, the worst it gets is an error and a closed connection: nothing it does reaches the
daemon or another client.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import secrets
import socket
import time
from typing import Any

import trio

from monitor.core import plan as reservations
from monitor.core.events import ConnectionClosed, Event, ReleaseRequested, ReserveRequested
from monitor.core.leases import Holder, Lease
from monitor.core.reducer import Answer
from monitor.engine.hub import Hub, Subscriber
from monitor.serving.access import Access, ConnectionCount, ConnectionLimits, Peer, peer_of
from monitor.sources import holders
from monitor.wire.protocol import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PERMISSION_DENIED,
    SERVER_BUSY,
    LineBuffer,
    LineTooLong,
    Request,
    RpcError,
    encode_error,
    encode_raw_result,
    encode_result,
    parse_request,
)

log = logging.getLogger(__name__)

RECEIVE_SIZE = 64 * 1024
LINGER_SECONDS = 2.0  # how long a refused client may go on sending before we close on it
# Unfinished lines across all connections. Each may be up to 1 MiB, but a thousand clients each
# sending most of one and stopping would hold a gigabyte (tests/test_abuse.py).
UNFINISHED_INPUT_BUDGET = 64 * 1024 * 1024
# Per connection. Every request is a checkpoint, so busy connections already share the loop in
# turn; beyond this rate a connection also waits (its socket buffer fills and its writes stop),
# so a client stuck in a loop cannot keep the daemon busy alone.
REQUESTS_PER_SECOND = 10_000.0
MAX_LINGERING = 256  # refused connections given time to read why, at once


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


def _device_ids(params: dict[str, Any]) -> list[str]:
    ids = params.get("device_ids")
    if (
        not isinstance(ids, list)
        or not ids
        or len(ids) > reservations.MAX_DEVICES_PER_REQUEST
        or not all(isinstance(i, str) and i for i in ids)
    ):
        raise RpcError(
            INVALID_PARAMS,
            "device_ids must be a non-empty list of device ID strings "
            f"(at most {reservations.MAX_DEVICES_PER_REQUEST}).",
        )
    return ids


def _expect_params(params: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise RpcError(INVALID_PARAMS, f"Unknown params: {', '.join(unknown)}.")


def _holder_pid(params: dict[str, Any]) -> int | None:
    pid = params.get("holder_pid")
    if pid is not None and (not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0):
        raise RpcError(INVALID_PARAMS, "holder_pid must be a positive process ID.")
    return pid


def _holder(pid: int, peer: Peer) -> Holder:
    """The process a client names as its lease's holder, once the client may reserve at all."""
    if not holders.in_our_pid_namespace(peer.pid):
        raise RpcError(
            INVALID_PARAMS,
            "holder_pid is refused from a client in another PID namespace (a container): "
            "its process IDs are not this host's.",
            {"holder_pid": pid},
        )
    try:
        return holders.identify(pid)
    except holders.HolderRefused as refusal:
        raise RpcError(INVALID_PARAMS, str(refusal), {"holder_pid": pid}) from None


class Pending:
    """A request waiting for the reducer task's answer."""

    def __init__(self, event: Event, key: str | int) -> None:
        self.event = event
        self.key = key
        self.answer: Answer | None = None
        self.done = trio.Event()


# What the reducer task takes in: a batch of events from a source, or a client's request.
Item = tuple[Event, ...] | Pending
Inbox = trio.MemorySendChannel[Item]


class Server:
    def __init__(
        self,
        hub: Hub,
        inbox: Inbox,
        *,
        access: Access | None = None,
        limits: ConnectionLimits | None = None,
        requests_per_second: float = REQUESTS_PER_SECOND,
    ) -> None:
        self.hub = hub
        self.inbox = inbox
        self.access = access or Access(None)
        self.limits = limits or ConnectionLimits()
        self.requests_per_second = requests_per_second
        self.connections = ConnectionCount()
        self.refusing = 0  # refused connections lingering so that they read why
        self._connections: trio.Nursery  # set by serve()
        self._accepting: trio.CancelScope | None = None  # the listener now accepting
        self.unfinished_input = 0  # bytes of unfinished lines held, all connections together
        self.node_exists = reservations.RecentNodeCheck()
        # Reservation IDs unique across restarts without a random read per reservation.
        self._lease_prefix = secrets.token_hex(6)
        self._serial = itertools.count(1)

    async def serve(
        self,
        sock: socket.socket,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept clients on ``sock`` (and later on what ``listen_on`` is given) until cancelled."""
        async with trio.open_nursery() as connections:
            self._connections = connections
            await connections.start(self._accept, sock)
            task_status.started()

    async def listen_on(self, sock: socket.socket) -> None:
        """Accept new clients on ``sock`` instead; connected clients are not touched."""
        await self._connections.start(self._accept, sock)

    async def _accept(
        self, sock: socket.socket, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        with trio.CancelScope() as scope:
            if self._accepting is not None:
                self._accepting.cancel()
            self._accepting = scope
            try:
                task_status.started()
                await trio.serve_listeners(
                    self.handle, [listener], handler_nursery=self._connections
                )
            finally:
                await trio.aclose_forcefully(listener)

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            peer = peer_of(stream.socket)  # type: ignore[arg-type]
        except OSError:  # gone before we could ask who it is
            await trio.aclose_forcefully(stream)
            return
        connection = _Connection(self, stream, next(self._serial), peer)
        privileged = self.access.privileged(peer)
        refusal = self.limits.refusal(self.connections, peer.uid, privileged)
        try:
            if refusal is not None:
                await self._refuse(connection, refusal)
            else:
                self.connections.add(peer.uid, privileged, +1)
                try:
                    await connection.run()
                finally:
                    self.connections.add(peer.uid, privileged, -1)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away; nothing to tell anyone
        finally:
            await trio.aclose_forcefully(stream)
            if connection.bound_leases:
                await self._tell_reducer(ConnectionClosed(connection.number))

    async def _refuse(self, connection: _Connection, refusal: str) -> None:
        """Tell a client it is refused. Each lingering refusal holds a file descriptor, so past
        MAX_LINGERING at once the next only drops what has arrived before it closes."""
        linger = self.refusing < MAX_LINGERING
        self.refusing += linger
        try:
            await connection.refuse(RpcError(SERVER_BUSY, refusal), linger)
        finally:
            self.refusing -= linger

    async def _tell_reducer(self, event: Event) -> None:
        """Send an event that must not be lost to a cancellation, unless we are shutting down."""
        # If the reducer task has ended, the daemon is stopping: nothing to tell.
        with (
            trio.CancelScope(shield=True),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
        ):
            await self.inbox.send((event,))

    async def ask(self, event: Event, key: str | int) -> Answer:
        """Hand a request to the reducer task and wait for its decision."""
        pending = Pending(event, key)
        await self.inbox.send(pending)
        await pending.done.wait()
        assert pending.answer is not None
        return pending.answer

    async def dispatch(self, request: Request, connection: _Connection) -> bytes | None:
        """The response to send, or None when the method has sent it already."""
        params = request.params
        if request.method == "fingerprint":
            _expect_params(params, set())
            await self.hub.ready.wait()
            return encode_raw_result(request.id, self.hub.snapshot_result())
        if request.method == "subscribe":
            _expect_params(params, set())
            await self.hub.ready.wait()
            await connection.subscribe(request)
            return None
        if request.method == "leases":
            _expect_params(params, set())
            await self.hub.ready.wait()
            return encode_result(request.id, self.leases())
        if request.method == "reserve":
            _expect_params(params, {"device_ids", "holder_pid", "bind"})
            await self.hub.ready.wait()
            return encode_result(request.id, await self.reserve(params, connection))
        if request.method == "release":
            await self.hub.ready.wait()
            return encode_result(request.id, await self.release(params, connection))
        raise RpcError(METHOD_NOT_FOUND, f"Unknown method {request.method!r}.")

    async def _authorize(self, connection: _Connection, action: str) -> None:
        peer = connection.peer
        if not self.access.may_change(peer):
            raise RpcError(
                PERMISSION_DENIED,
                f"Only root and members of the daemon's group may {action} devices "
                f"(you are uid {peer.uid}).",
                {"uid": peer.uid},
            )

    async def reserve(self, params: dict[str, Any], connection: _Connection) -> dict[str, Any]:
        ids = _device_ids(params)
        bind = params.get("bind")
        if bind not in (None, "connection"):
            raise RpcError(INVALID_PARAMS, 'bind must be "connection" when given.')
        holder_pid = _holder_pid(params)
        await self._authorize(connection, "reserve")  # before anything is looked up for it
        peer = connection.peer
        holder = _holder(holder_pid, peer) if holder_pid is not None else None
        lease = Lease(
            id=f"{self._lease_prefix}-{next(self._serial)}",
            devices={},
            uid=peer.uid,
            gid=peer.gid,
            pid=peer.pid,
            created=time.time(),
            holder=holder,
            connection=connection.number if bind else None,
        )
        answer = await self.ask(ReserveRequested(tuple(ids), lease), lease.id)
        if isinstance(answer, RpcError):
            raise answer
        assert isinstance(answer, Lease)
        if bind:
            connection.bound_leases = True
        log.info(
            "reservation %s granted to uid %d (pid %d): %s",
            answer.id,
            peer.uid,
            peer.pid,
            ", ".join(answer.devices),
        )
        state = self.hub.state
        index = state.fingerprint.devices()
        edits = reservations.plan(
            [index[d] for d in answer.devices if d in index],
            minor_of=state.nvidia_minor,
            exists=self.node_exists,
        )
        return {"reservation_id": answer.id, "device_ids": list(answer.devices), **edits.to_json()}

    async def release(self, params: dict[str, Any], connection: _Connection) -> dict[str, Any]:
        token = next(self._serial)
        uid = connection.peer.uid
        if set(params) == {"reservation_id"} and isinstance(params["reservation_id"], str):
            event = ReleaseRequested(token, uid, lease_id=params["reservation_id"])
        elif set(params) == {"device_ids"}:
            event = ReleaseRequested(token, uid, device_ids=tuple(_device_ids(params)))
        else:
            raise RpcError(
                INVALID_PARAMS, 'release takes either "device_ids" (a list) or "reservation_id".'
            )
        await self._authorize(connection, "release")
        answer = await self.ask(event, token)
        if isinstance(answer, RpcError):
            raise answer
        assert isinstance(answer, list)
        return {"released": answer}

    def leases(self) -> dict[str, Any]:
        """Every lease, with the devices of it that are no longer on the host."""
        state = self.hub.state
        present = set(state.devices)
        return {
            "leases": [
                {
                    **lease.to_json(),
                    "bind": "connection" if lease.connection is not None else None,
                    "orphaned": [d for d in lease.devices if d not in present],
                }
                for lease in state.leases.values()
            ]
        }


class _Connection:
    def __init__(self, server: Server, stream: trio.SocketStream, number: int, peer: Peer) -> None:
        self.server = server
        self.stream = stream
        self.number = number
        self.peer = peer
        self.bound_leases = False  # whether a lease ends when this connection closes
        self.budget = RequestBudget(server.requests_per_second)
        self.send_lock = trio.Lock()
        self.subscriber: Subscriber | None = None
        self.nursery: trio.Nursery | None = None

    async def send(self, data: bytes) -> None:
        async with self.send_lock:
            await self.stream.send_all(data)

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
                self.server.unfinished_input -= buffer.pending
                nursery.cancel_scope.cancel()
                if self.subscriber is not None:
                    self.server.hub.unsubscribe(self.subscriber)

    async def _answer_lines(self, buffer: LineBuffer) -> RpcError | None:
        """Answer each request line until EOF; the error to close with, if the client is refused.

        Returns before the refusal is sent, so that no received data is held while we linger."""
        timeout = self.server.limits.timeout
        active = trio.current_time()  # when the connection last finished something
        line_begun = active  # when its unfinished line began, if it has one
        while True:
            if buffer.pending:
                deadline, why = line_begun + timeout, "finished no request line"
            elif self.subscriber is not None or self.bound_leases:
                deadline, why = math.inf, ""  # it has a reason to stay quiet
            else:
                deadline, why = active + timeout, "sent nothing"
            with trio.move_on_at(deadline):
                data = await self.stream.receive_some(RECEIVE_SIZE)
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
                active = trio.current_time()
                if buffer.pending and (lines or not had_pending):
                    line_begun = active
                continue
            return RpcError(SERVER_BUSY, f"This connection {why} for {timeout:g} s; closing.")

    def _take_lines(self, buffer: LineBuffer, data: bytes) -> list[bytes]:
        """The lines ``data`` completes; RpcError, and the unfinished line dropped, when the
        connection is to be refused for the length of its line or for the daemon's memory."""
        server = self.server
        server.unfinished_input -= buffer.pending
        try:
            lines = buffer.feed(data)
        except LineTooLong:
            buffer.clear()
            raise RpcError(INVALID_REQUEST, "Request line exceeds 1 MiB; closing.") from None
        if buffer.pending and server.unfinished_input + buffer.pending > UNFINISHED_INPUT_BUDGET:
            buffer.clear()
            raise RpcError(
                SERVER_BUSY,
                "The daemon holds too much unfinished input from clients; send whole lines. "
                "Closing.",
            )
        server.unfinished_input += buffer.pending
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
        self.nursery.start_soon(self._pump, self.subscriber)

    async def _pump(self, subscriber: Subscriber) -> None:
        """Write notifications; a subscriber that reads nothing for the timeout is closed."""
        while True:
            message = await subscriber.next_message(self.server.hub)
            with trio.move_on_after(self.server.limits.timeout) as stuck:
                await self.send(message)
            if stuck.cancelled_caught:
                uid, pid = self.peer.uid, self.peer.pid
                log.info("closing a subscriber that stopped reading (uid %d, pid %d)", uid, pid)
                assert self.nursery is not None
                self.nursery.cancel_scope.cancel()
                return

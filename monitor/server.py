"""The Unix socket: one task per connection, JSON-RPC framing, subscribers fed from the hub.

Each connection has a reader (requests in, responses out) and, once it subscribes, a writer task
that drains its subscriber buffer; a per-connection lock keeps their lines whole. Whatever a
client sends, the worst it gets is an error and a closed connection: nothing it does reaches the
daemon or another client.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from pathlib import Path
from typing import Any

import trio

from monitor import reservations
from monitor.hub import Hub, Subscriber
from monitor.protocol import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
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
LISTEN_BACKLOG = 4096


class SocketInUse(Exception):
    """Another daemon answers on the socket path."""


def bind_unix_socket(path: Path, mode: int) -> socket.socket:
    """Listen on ``path``, replacing a stale socket file but never a live one."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        existing = path.lstat()
    except FileNotFoundError:
        existing = None
    if existing is not None:
        if not stat.S_ISSOCK(existing.st_mode):
            raise SocketInUse(f"{path} exists and is not a socket; remove it or choose --socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise
            log.info("replacing stale socket %s", path)
            path.unlink(missing_ok=True)
        else:
            raise SocketInUse(f"another hotplug-monitor is already serving on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, mode)
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


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


class Server:
    def __init__(self, hub: Hub, *, max_clients: int = 4096) -> None:
        self.hub = hub
        self.max_clients = max_clients
        self.clients = 0
        self.reservations = reservations.ReservationTable()
        self.node_exists = reservations.RecentNodeCheck()

    async def serve(
        self,
        sock: socket.socket,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        async with trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(self.handle, [listener], handler_nursery=nursery)

    async def handle(self, stream: trio.SocketStream) -> None:
        connection = _Connection(self, stream)
        self.clients += 1
        try:
            if self.clients > self.max_clients:
                await connection.refuse_busy()
            else:
                await connection.run()
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away; nothing to tell anyone
        finally:
            self.clients -= 1
            await trio.aclose_forcefully(stream)

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
        if request.method == "reserve":
            _expect_params(params, {"device_ids"})
            await self.hub.ready.wait()
            return encode_result(request.id, self.reserve(_device_ids(params)))
        if request.method == "release":
            return encode_result(request.id, self.release(params))
        raise RpcError(METHOD_NOT_FOUND, f"Unknown method {request.method!r}.")

    def reserve(self, ids: list[str]) -> dict[str, Any]:
        state = self.hub.state
        devices = reservations.resolve(state.fingerprint, ids)
        edits = reservations.plan(
            devices,
            minor_of=lambda address: state.devices[address].nvidia_minor,
            exists=self.node_exists,
        )
        reservation = self.reservations.add([device.id for _, device in devices])
        self.hub.changed.set()
        return {
            "reservation_id": reservation.id,
            "device_ids": list(reservation.device_ids),
            **edits.to_json(),
        }

    def release(self, params: dict[str, Any]) -> dict[str, Any]:
        if set(params) == {"reservation_id"} and isinstance(params["reservation_id"], str):
            released = self.reservations.release_by_id(params["reservation_id"])
        elif set(params) == {"device_ids"}:
            index = reservations.device_index(self.hub.state.fingerprint)
            wanted = [index[i][1].id if i in index else i.lower() for i in _device_ids(params)]
            released = self.reservations.release_devices(wanted)
        else:
            raise RpcError(
                INVALID_PARAMS, 'release takes either "device_ids" (a list) or "reservation_id".'
            )
        self.hub.changed.set()
        return {"released": released}


class _Connection:
    def __init__(self, server: Server, stream: trio.SocketStream) -> None:
        self.server = server
        self.stream = stream
        self.send_lock = trio.Lock()
        self.subscriber: Subscriber | None = None
        self.nursery: trio.Nursery | None = None

    async def send(self, data: bytes) -> None:
        async with self.send_lock:
            await self.stream.send_all(data)

    async def refuse_busy(self) -> None:
        limit = self.server.max_clients
        error = RpcError(SERVER_BUSY, f"Too many clients (limit {limit}); try again later.")
        with trio.move_on_after(1):
            await self.send(encode_error(error))

    async def run(self) -> None:
        buffer = LineBuffer()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            try:
                while data := await self.stream.receive_some(RECEIVE_SIZE):
                    try:
                        lines = buffer.feed(data)
                    except LineTooLong:
                        error = RpcError(INVALID_REQUEST, "Request line exceeds 1 MiB; closing.")
                        await self.send(encode_error(error))
                        return
                    for line in lines:
                        if line.strip():
                            await self.answer(line)
            finally:
                nursery.cancel_scope.cancel()
                if self.subscriber is not None:
                    self.server.hub.unsubscribe(self.subscriber)

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
        while True:
            message = await subscriber.next_message(self.server.hub)
            await self.send(message)

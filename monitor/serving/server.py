"""The Unix socket server: accepts clients, checks each method's params, and hands requests to
the core through the reducer task.

The server says who asks (the peer the kernel saw) and what is asked, in the core's terms; the
core decides (``monitor.core.rules``), and the server writes its answer in the protocol's terms:
a refusal's reason becomes a JSON-RPC error code here.
"""

from __future__ import annotations

import contextlib
import itertools
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

import trio

from monitor.core.answers import Answer, Grant, Reason, Refusal, Released
from monitor.core.events import (
    ConnectionClosed,
    Event,
    ReconcileRequested,
    ReleaseRequested,
    ReserveRequested,
)
from monitor.core.leases import MAX_DEVICES, OWNER, Holder
from monitor.core.plan import plan
from monitor.core.rules.leasing import may_reserve
from monitor.engine.hub import Hub
from monitor.engine.inbox import Inbox, ask
from monitor.engine.stats import StatsHub, Telemetry
from monitor.outputs.cdi import CdiSpec
from monitor.serving.connection import Connection, UnfinishedInput
from monitor.serving.limits import ConnectionCount, ConnectionLimits
from monitor.serving.nodes import RecentNodeCheck
from monitor.serving.peers import peer_of
from monitor.serving.timeouts import Timeouts
from monitor.sources import holders
from monitor.wire.errors import (
    DEVICE_RESERVED,
    DEVICE_UNHEALTHY,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    METHOD_NOT_FOUND,
    PERMISSION_DENIED,
    SERVER_BUSY,
    UNKNOWN_DEVICE,
    RpcError,
)
from monitor.wire.framing import Request, encode_raw_result, encode_result
from monitor.wire.reservations import cdi_name
from monitor.wire.stats import MAX_INTERVAL, MIN_INTERVAL

# Per connection. Every request is a checkpoint, so busy connections already share the loop in
# turn; beyond this rate a connection also waits (its socket buffer fills and its writes stop),
# so a client stuck in a loop cannot keep the daemon busy alone.
REQUESTS_PER_SECOND = 10_000.0
MAX_LINGERING = 256  # refused connections given time to read why, at once

ERROR_CODES = {
    Reason.UNKNOWN_DEVICE: UNKNOWN_DEVICE,
    Reason.UNHEALTHY: DEVICE_UNHEALTHY,
    Reason.RESERVED: DEVICE_RESERVED,
    Reason.FORBIDDEN: PERMISSION_DENIED,
    Reason.INVALID: INVALID_PARAMS,
    Reason.NOT_RECORDED: INTERNAL_ERROR,
}


def rpc_error(refusal: Refusal) -> RpcError:
    data = dict(refusal.data) if refusal.data is not None else None
    return RpcError(ERROR_CODES[refusal.reason], refusal.message, data)


def _device_ids(params: dict[str, Any]) -> tuple[str, ...]:
    ids = params.get("device_ids")
    if (
        not isinstance(ids, list)
        or not ids
        or len(ids) > MAX_DEVICES
        or not all(isinstance(i, str) and i for i in ids)
    ):
        raise RpcError(
            INVALID_PARAMS,
            f"device_ids must be a non-empty list of device ID strings (at most {MAX_DEVICES}).",
        )
    return tuple(ids)


def _expect_params(params: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise RpcError(INVALID_PARAMS, f"Unknown params: {', '.join(unknown)}.")


def _owner(params: dict[str, Any], required: bool = False) -> str | None:
    owner: Any = params.get("owner")
    if owner is None and not required:
        return None
    if not isinstance(owner, str) or not OWNER.fullmatch(owner):
        raise RpcError(
            INVALID_PARAMS,
            "owner must be a scheduler's name: 1 to 64 of a-z, 0-9, '.', '_' and '-'.",
        )
    return owner


def _interval(params: dict[str, Any]) -> float:
    interval: Any = params.get("interval")
    if (
        not isinstance(interval, int | float)
        or isinstance(interval, bool)
        or not MIN_INTERVAL <= interval <= MAX_INTERVAL
    ):
        raise RpcError(
            INVALID_PARAMS,
            f"interval must be a number of seconds from {MIN_INTERVAL} to {MAX_INTERVAL}.",
        )
    return float(interval)


def _holder_pid(params: dict[str, Any]) -> int | None:
    pid: Any = params.get("holder_pid")
    if pid is not None and (not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0):
        raise RpcError(INVALID_PARAMS, "holder_pid must be a positive process ID.")
    return pid


class Server:
    def __init__(
        self,
        hub: Hub,
        inbox: Inbox,
        *,
        limits: ConnectionLimits | None = None,
        requests_per_second: float = REQUESTS_PER_SECOND,
        cdi: CdiSpec | None = None,
        telemetry: Telemetry | None = None,
        on_close: Callable[[], object] = lambda: None,
    ) -> None:
        self.hub = hub
        self.on_close = on_close  # told after each connection ends (memory.GiveBack)
        self.telemetry = telemetry or Telemetry(StatsHub(hub, ()))
        self.cdi = cdi  # the CDI spec of the devices, if one is kept: reserve names its entries
        self.inbox = inbox
        self.limits = limits or ConnectionLimits()
        self.requests_per_second = requests_per_second
        self.connections = ConnectionCount()
        self.unfinished = UnfinishedInput()
        self.refusing = 0  # refused connections lingering so that they read why
        self.node_exists = RecentNodeCheck()
        self.timeouts = Timeouts()
        self._connections: trio.Nursery  # set by serve()
        self._accepting: trio.CancelScope | None = None  # the listener now accepting
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
            await connections.start(self.telemetry.stats.run)  # samples outlive who asked
            connections.start_soon(self.timeouts.run)
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
        connection = Connection(self, stream, next(self._serial), peer)
        privileged = self.hub.state.access.privileged(peer)
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
            self.on_close()

    async def _refuse(self, connection: Connection, refusal: str) -> None:
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

    async def dispatch(self, request: Request, connection: Connection) -> bytes | None:
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
            _expect_params(params, {"device_ids", "holder_pid", "bind", "owner"})
            await self.hub.ready.wait()
            return encode_result(request.id, await self.reserve(params, connection))
        if request.method == "release":
            await self.hub.ready.wait()
            return encode_result(request.id, await self.release(params, connection))
        if request.method == "stats":
            _expect_params(params, {"interval"})
            interval = _interval(params)
            await self.hub.ready.wait()
            await connection.stream_stats(request, interval, self.telemetry.stats)
            return None
        if request.method == "status":
            _expect_params(params, set())
            await self.hub.ready.wait()
            return encode_result(request.id, self.telemetry.status())
        if request.method == "reconcile":
            _expect_params(params, {"owner", "device_ids"})
            await self.hub.ready.wait()
            return encode_result(request.id, await self.reconcile(params, connection))
        raise RpcError(METHOD_NOT_FOUND, f"Unknown method {request.method!r}.")

    async def reserve(self, params: dict[str, Any], connection: Connection) -> dict[str, Any]:
        ids = _device_ids(params)
        bind = params.get("bind")
        if bind not in (None, "connection"):
            raise RpcError(INVALID_PARAMS, 'bind must be "connection" when given.')
        owner = _owner(params)
        peer = connection.peer
        holder_pid = _holder_pid(params)
        holder: Holder | None = None
        if holder_pid is not None:
            # the core's rule first: an outsider learns nothing of which PIDs exist
            refusal = may_reserve(self.hub.state.access, peer, holder_pid)
            if refusal is not None:
                raise rpc_error(refusal)
            try:
                holder = holders.identify(holder_pid)
            except holders.HolderRefused as exc:
                raise RpcError(INVALID_PARAMS, str(exc), {"holder_pid": holder_pid}) from None
        request = ReserveRequested(
            token=next(self._serial),
            peer=peer,
            device_ids=ids,
            lease_id=f"{self._lease_prefix}-{next(self._serial)}",
            created=time.time(),
            holder=holder,
            connection=connection.number if bind else None,
            owner=owner,
        )
        answer = await ask(self.inbox, request)
        if isinstance(answer, Refusal):
            raise rpc_error(answer)
        assert isinstance(answer, Grant)
        if bind:
            connection.bound_leases = True
        minors, exists = answer.nvidia_minors.get, self.node_exists
        edits = plan(answer.devices, minor_of=minors, exists=exists)
        lease = answer.lease
        result = {"reservation_id": lease.id, "device_ids": list(lease.devices), **edits.to_json()}
        if self.cdi is not None:  # the spec's entries: devices with something to inject
            await self.cdi.wait_until_current(self.hub.state)  # named once they are there
            result["cdi_devices"] = [
                cdi_name(device.id)
                for group, device in answer.devices
                if not plan([(group, device)], minor_of=minors, exists=exists).empty
            ]
        return result

    async def release(self, params: dict[str, Any], connection: Connection) -> dict[str, Any]:
        token, peer = next(self._serial), connection.peer
        owner = _owner(params)
        which = set(params) - {"owner"}
        if which == {"reservation_id"} and isinstance(params["reservation_id"], str):
            lease_id = params["reservation_id"]
            request = ReleaseRequested(token, peer, lease_id=lease_id, owner=owner)
        elif which == {"device_ids"}:
            request = ReleaseRequested(token, peer, device_ids=_device_ids(params), owner=owner)
        elif not which and owner is not None:  # every lease of that owner
            request = ReleaseRequested(token, peer, owner=owner)
        else:
            raise RpcError(
                INVALID_PARAMS,
                'release takes "device_ids" (a list) or "reservation_id", optionally with '
                '"owner"; or "owner" alone, for all its leases.',
            )
        return self._released(await ask(self.inbox, request))

    async def reconcile(self, params: dict[str, Any], connection: Connection) -> dict[str, Any]:
        ids: Any = params.get("device_ids")
        if (
            not isinstance(ids, list)
            or len(ids) > MAX_DEVICES
            or not all(isinstance(i, str) for i in ids)
        ):
            raise RpcError(
                INVALID_PARAMS,
                f"device_ids must be a list of the device IDs in use (at most {MAX_DEVICES}).",
            )
        owner = _owner(params, required=True)
        assert owner is not None
        request = ReconcileRequested(next(self._serial), connection.peer, owner, tuple(ids))
        return self._released(await ask(self.inbox, request))

    @staticmethod
    def _released(answer: Answer) -> dict[str, Any]:
        if isinstance(answer, Refusal):
            raise rpc_error(answer)
        assert isinstance(answer, Released)
        return {"released": list(answer.released), "not_reserved": list(answer.not_reserved)}

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

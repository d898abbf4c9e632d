"""The Unix socket server: accepts clients, and answers each request as the request table says
(``monitor.serving.requests``), waiting where it must.

The table says what a method asks, in the core's terms, and what its answer is on the wire;
the core decides (``monitor.core.rules``). The server supplies what only the edge knows (who
asks, as the kernel saw it; the holder process a lease follows; which device nodes exist) and
does the waiting: for the first state, for the reducer's answer, for the CDI spec.
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

from monitor.core.access import Peer
from monitor.core.answers import Refusal, Released
from monitor.core.events import ConnectionClosed, Event
from monitor.core.leases import Holder
from monitor.core.plan import vendor_nodes
from monitor.core.rules.leasing import may_reserve
from monitor.engine.hub import Hub
from monitor.engine.inbox import Inbox, ask
from monitor.engine.stats import StatsHub, Telemetry
from monitor.outputs.cdi import CdiSpec
from monitor.serving import requests
from monitor.serving.connection import Connection, UnfinishedInput
from monitor.serving.limits import ConnectionCount, ConnectionLimits, LeaseRate
from monitor.serving.nodes import RecentNodeCheck
from monitor.serving.peers import peer_of
from monitor.serving.requests import Ask, Asked, Read, StreamStats, rpc_error
from monitor.serving.timeouts import Timeouts
from monitor.sources import holders
from monitor.wire.errors import SERVER_BUSY, RpcError
from monitor.wire.framing import Request, encode_raw_result, encode_result

# Per connection. Every request is a checkpoint, so busy connections already share the loop in
# turn; beyond this rate a connection also waits (its socket buffer fills and its writes stop),
# so a client stuck in a loop cannot keep the daemon busy alone.
REQUESTS_PER_SECOND = 10_000.0
MAX_LINGERING = 256  # refused connections given time to read why, at once


class Server:
    def __init__(
        self,
        hub: Hub,
        inbox: Inbox,
        *,
        limits: ConnectionLimits | None = None,
        lease_rate: LeaseRate | None = None,
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
        self.lease_rate = lease_rate  # None: no limit on lease changes
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
        call = requests.parse(request.method, request.params)
        if isinstance(call, Refusal):
            raise rpc_error(call)
        if not self.hub.ready.is_set():  # ``wait`` on a set event would still yield once
            await self.hub.ready.wait()
        if call is Read.SNAPSHOT:
            return encode_raw_result(request.id, self.hub.snapshot_result())
        if call is Read.SUBSCRIBE:
            await connection.subscribe(request)
            return None
        if call is Read.LEASES:
            return encode_result(request.id, requests.leases(self.hub.state))
        if call is Read.STATUS:
            return encode_result(request.id, self.telemetry.status())
        if isinstance(call, StreamStats):
            await connection.stream_stats(request, call.interval, self.telemetry.stats)
            return None
        return encode_result(request.id, await self._ask(call, connection))

    async def _ask(self, call: Ask, connection: Connection) -> dict[str, Any]:
        """Hand the request to the reducer; its answer, or its refusal raised."""
        peer = connection.peer
        if self.lease_rate is not None and not self.hub.state.access.privileged(peer):
            slow_down = self.lease_rate.refusal(peer.uid, trio.current_time())
            if slow_down is not None:
                raise RpcError(SERVER_BUSY, slow_down)
        holder = None if call.holder_pid is None else self._holder(peer, call.holder_pid)
        cdi_nodes = self._cdi_nodes() if call.cdi else None
        asked = Asked(
            peer=peer,
            connection=connection.number,
            token=next(self._serial),
            lease_id=f"{self._lease_prefix}-{next(self._serial)}",
            created=time.time(),
            holder=holder,
            cdi_nodes=cdi_nodes,
        )
        answer = await ask(self.inbox, call.request(asked))
        if isinstance(answer, Refusal):
            raise rpc_error(answer)
        if isinstance(answer, Released):
            if self.cdi is not None and self.cdi.leased:  # the ended leases' entries are gone
                await self.cdi.wait_until_current(self.hub.state)
            return requests.released(answer)
        if answer.lease.connection is not None:
            connection.bound_leases = True
        result = requests.reserved(answer, self.node_exists)
        if self.cdi is not None:  # the spec's entries: devices with something to inject
            await self.cdi.wait_until_current(self.hub.state)  # named once they are there
            result["cdi_devices"] = (
                self.cdi.lease_names(answer.lease.id)
                if self.cdi.leased
                else requests.cdi_devices(answer, self.node_exists)
            )
        return result

    def _cdi_nodes(self) -> frozenset[str]:
        """For a reserve for CDI: the vendor device nodes on disk, which decide which devices
        the spec names; refused at once when no spec is kept."""
        if self.cdi is None:
            raise rpc_error(requests.NO_CDI_SPEC)
        state = self.hub.state
        minors = [m for a in state.devices if (m := state.nvidia_minor(a)) is not None]
        return frozenset(p for p in vendor_nodes(minors) if self.node_exists(p))

    def _holder(self, peer: Peer, holder_pid: int) -> Holder:
        """The process a lease is to follow; the core's rule first, so that a client that may
        not reserve learns nothing of which PIDs exist."""
        refusal = may_reserve(self.hub.state.access, peer, holder_pid)
        if refusal is None:
            try:
                return holders.identify(holder_pid)
            except holders.HolderRefused as exc:
                refusal = requests.holder_refused(holder_pid, str(exc))
        raise rpc_error(refusal)

"""Where a scheduler's gRPC call meets the daemon's socket: what the kubelet and Nomad plugins
share, written once.

- the daemon's refusals as gRPC statuses (``STATUS_BY_CODE``, ``status_for``), and the except
  ladder around a call to the daemon (``ask``: a refusal, an unreachable or silent daemon, an
  answer no client should use, each aborting the call with its status);
- a reservation asked for and checked (``reserve``), and turned into the container edits of
  either scheduler's protocol (``container_edits``);
- following the daemon for good (``follow``), with its reachability and what a snapshot left
  out said once per change (``Reachability``).

Imports monitor.wire and grpc only. The adapters that import it are imported by their own
commands alone (``monitor/cli/kubelet.py``, ``monitor/cli/nomad.py``), so no other command
loads gRPC.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, Protocol, TypeVar

import grpc

from monitor.wire import asyncio_transport, errors, requests
from monitor.wire.backoff import Backoff
from monitor.wire.errors import DaemonUnavailable, RpcError
from monitor.wire.follow import Emit
from monitor.wire.requests import Call
from monitor.wire.reservations import BadAnswer, check_reservation
from monitor.wire.snapshot import MIG_UUID, PCI_ADDRESS, shared_replica_of, text

T = TypeVar("T")
M = TypeVar("M")

UNREACHABLE = "hotplug-monitor daemon not reachable"
MAX_SKIPPED_SAID = 20  # of a snapshot's left-out entries, the ones logged

# The daemon's refusals as gRPC statuses (the scheduler shows the message with the code); any
# other code is the daemon's fault as far as the scheduler can tell: INTERNAL.
STATUS_BY_CODE = {
    errors.UNKNOWN_DEVICE: grpc.StatusCode.NOT_FOUND,
    errors.DEVICE_UNHEALTHY: grpc.StatusCode.FAILED_PRECONDITION,
    errors.DEVICE_RESERVED: grpc.StatusCode.FAILED_PRECONDITION,
    errors.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    errors.INVALID_PARAMS: grpc.StatusCode.INVALID_ARGUMENT,
    errors.SERVER_BUSY: grpc.StatusCode.UNAVAILABLE,
}

# What may go wrong asking the daemon: each becomes a gRPC status (``refusal``).
ASKING_ERRORS = (RpcError, DaemonUnavailable, TimeoutError, BadAnswer)
AskingError = RpcError | DaemonUnavailable | TimeoutError | BadAnswer


def status_for(error: RpcError) -> tuple[grpc.StatusCode, str]:
    """The status for a refusal, with the daemon's sentence when it is fit to show."""
    code = STATUS_BY_CODE.get(error.code, grpc.StatusCode.INTERNAL)
    return code, text(error.message, 1024) or f"the daemon refused (code {error.code})"


def refusal(error: AskingError, timeout: float) -> tuple[grpc.StatusCode, str]:
    """The status a call ends with when asking the daemon (within ``timeout`` seconds) failed."""
    if isinstance(error, RpcError):
        return status_for(error)
    if isinstance(error, DaemonUnavailable):
        return grpc.StatusCode.UNAVAILABLE, f"{UNREACHABLE}: {error}"
    if isinstance(error, TimeoutError):
        return (
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"the daemon did not answer within {timeout:g} s",
        )
    return grpc.StatusCode.INTERNAL, str(error)


class Aborter(Protocol):
    """What ``ask`` needs of a gRPC servicer context."""

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn: ...


async def ask(
    context: Aborter,
    timeout: float,
    work: Callable[[], Awaitable[T]],
    *,
    refused: Callable[[str], object],
    bad_answer: Callable[[BadAnswer], object],
) -> T:
    """What ``work`` (which asks the daemon) returns within ``timeout`` seconds; else the call
    is aborted with the status for what went wrong. ``refused`` is told the daemon's refusal
    and ``bad_answer`` an answer refused here, for the adapter's log; an unreachable or silent
    daemon is said by the status alone (the plugin logs reachability as it follows)."""
    try:
        async with asyncio.timeout(timeout):
            return await work()
    except ASKING_ERRORS as error:
        code, message = refusal(error, timeout)
        if isinstance(error, RpcError):
            refused(message)
        elif isinstance(error, BadAnswer):
            bad_answer(error)
        await context.abort(code, message)


class Asker(Protocol):
    """What ``reserve`` needs of a connection to the daemon (``AsyncioClient``)."""

    async def ask(self, call: Call) -> Any: ...


async def reserve(client: Asker, ids: Sequence[str], owner: str) -> dict[str, Any]:
    """The daemon's reservation of ``ids`` for ``owner``, checked before a container gets it:
    of a shape the daemon plans, and, when asked by device ID (a PCI address, a MIG UUID, a
    replica's), for exactly those devices. A
    lease the container will not get is released before the refusal is raised, so that no
    device stays held for nobody."""
    answer = await client.ask(requests.reserve(ids, owner=owner))
    try:
        result = check_reservation(answer)
        granted = result["device_ids"]
        exact = all(
            PCI_ADDRESS.fullmatch(i) or MIG_UUID.fullmatch(i) or shared_replica_of(i) for i in ids
        )
        if exact and set(granted) != set(ids):
            raise BadAnswer(f"refusing the daemon's reservation: it is for {granted}, not {ids}")
    except BadAnswer as refused:
        lease = answer.get("reservation_id") if isinstance(answer, dict) else None
        if not isinstance(lease, str):
            raise
        try:
            await client.ask(requests.release(reservation_id=lease, owner=owner))
        except (RpcError, DaemonUnavailable, BadAnswer) as exc:
            raise BadAnswer(f"{refused}; and releasing {lease} failed: {exc}") from None
        raise BadAnswer(f"{refused}; released it ({lease})") from None
    return result


def container_edits(
    result: Mapping[str, Any],
    edits: Callable[..., M],
    mount: Callable[..., object],
    device: Callable[..., object],
    path: str,
) -> M:
    """A checked ``reserve`` answer as a scheduler's container edits: ``edits`` made with the
    answer's environment, ``mount``s and ``device`` specs, ``path`` naming the field for the
    path inside the container (the kubelet's ``container_path``, Nomad's ``task_path``)."""
    return edits(
        envs=dict(result["envs"]),
        mounts=[
            mount(**{path: m["task_path"]}, host_path=m["host_path"], read_only=m["read_only"])
            for m in result["mounts"]
        ],
        devices=[
            device(
                **{path: d["task_path"]}, host_path=d["host_path"], permissions=d["cgroup_perms"]
            )
            for d in result["devices"]
        ],
    )


class Reachability:
    """Whether the daemon answered last (None: not asked yet), each change said once in the
    adapter's words: ``lost``, ``back``, and ``left_out`` for what a snapshot left out (when
    that changed; the first ``MAX_SKIPPED_SAID`` entries)."""

    def __init__(
        self,
        *,
        lost: Callable[[], object],
        back: Callable[[], object],
        left_out: Callable[[str], object],
    ) -> None:
        self.reachable: bool | None = None
        self._lost, self._back, self._left_out = lost, back, left_out
        self._skipped: tuple[str, ...] = ()

    def unreachable(self) -> None:
        """The daemon could not be asked."""
        if self.reachable is not False:
            self._lost()
        self.reachable = False

    def answered(self, skipped: tuple[str, ...]) -> None:
        """The daemon answered with a snapshot that left ``skipped`` out."""
        if self.reachable is False:
            self._back()
        self.reachable = True
        if skipped != self._skipped:
            for reason in skipped[:MAX_SKIPPED_SAID]:
                self._left_out(reason)
        self._skipped = skipped

    def forget(self) -> None:
        """Not asked yet (another daemon is followed from now on)."""
        self.reachable = None


async def follow(
    socket: Path,
    emit: Emit,
    unreadable: Callable[[Exception], object],
    backoff: Backoff | None = None,
) -> NoReturn:
    """Follow the daemon on ``socket`` for good (``monitor.wire.asyncio_transport.follow``):
    ``emit`` each snapshot, and None while it cannot be reached. An answer that cannot be read
    (told to ``unreadable``) counts as the daemon gone, and it is followed again after a
    backoff."""
    backoff = backoff or Backoff()
    while True:
        try:
            await asyncio_transport.follow(socket, emit, backoff)
        except Exception as error:
            unreadable(error)
            await emit(None)
            await asyncio.sleep(backoff.delay())
